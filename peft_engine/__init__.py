"""peft_engine: parameter-efficient fine-tuning with HF PEFT's names and adapter file format.

Public names follow HF PEFT (``LoraConfig``, ``get_peft_model``, ``PeftModel`` ...) so that
code and adapter folders move between the two without change.
"""

from .bases import BaseSpecError, base_weight_bytes, load_base
from .cache import cache_info, cache_root, clear_cache
from .config import PeftConfig, PeftType, TaskType
from .methods import METHODS, MethodSpec, get_method, register_method
from .model import (
    MODEL_TYPE_TO_PEFT_MODEL,
    PeftModel,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForTokenClassification,
    get_peft_model,
    inject_adapter_in_model,
    register_tuner,
)
from .quantization import create_quantized_lora_layer, prepare_model_for_kbit_training  # noqa: E402
from .save_load import get_peft_model_state_dict, set_peft_model_state_dict
from .tuners.adalora import AdaLoraConfig, AdaLoraModel
from .tuners.boft import BOFTConfig, BOFTModel
from .tuners.ia3 import IA3Config, IA3Model
from .tuners.loha import LoHaConfig, LoHaModel
from .tuners.lokr import LoKrConfig, LoKrModel
from .tuners.lora import LoftQConfig, LoraConfig, LoraModel
from .tuners.oft import OFTConfig, OFTModel
from .tuners.prompts import (
    AdaptionPromptConfig,
    AdaptionPromptModel,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptLearningModel,
    PromptTuningConfig,
)
from .tuners.vera import VeraConfig, VeraModel

register_tuner(PeftType.LORA.value, LoraModel)
LoraModel.layer_factories.append(create_quantized_lora_layer)
for _prompt_type in (PeftType.PROMPT_TUNING, PeftType.PREFIX_TUNING, PeftType.P_TUNING, PeftType.MULTITASK_PROMPT_TUNING):
    register_tuner(_prompt_type.value, PromptLearningModel)
register_tuner(PeftType.ADAPTION_PROMPT.value, AdaptionPromptModel)
for _peft_type, _tuner in ((PeftType.ADALORA, AdaLoraModel), (PeftType.BOFT, BOFTModel), (PeftType.IA3, IA3Model),
                           (PeftType.LOHA, LoHaModel), (PeftType.LOKR, LoKrModel), (PeftType.OFT, OFTModel),
                           (PeftType.VERA, VeraModel)):
    register_tuner(_peft_type.value, _tuner)

from .mixed import PeftMixedModel  # noqa: E402  (imports the tuners above)

__all__ = [
    "BaseSpecError",
    "base_weight_bytes",
    "cache_info",
    "cache_root",
    "clear_cache",
    "load_base",
    "METHODS",
    "MODEL_TYPE_TO_PEFT_MODEL",
    "AdaLoraConfig",
    "AdaLoraModel",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "BOFTConfig",
    "BOFTModel",
    "IA3Config",
    "IA3Model",
    "LoHaConfig",
    "LoHaModel",
    "LoKrConfig",
    "LoKrModel",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "MethodSpec",
    "MultitaskPromptTuningConfig",
    "OFTConfig",
    "OFTModel",
    "PeftConfig",
    "PeftMixedModel",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "TaskType",
    "VeraConfig",
    "VeraModel",
    "get_method",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "prepare_model_for_kbit_training",
    "register_method",
    "set_peft_model_state_dict",
]
