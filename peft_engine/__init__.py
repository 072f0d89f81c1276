"""peft_engine: parameter-efficient fine-tuning with HF PEFT's names and adapter file format.

Public names follow HF PEFT (``LoraConfig``, ``get_peft_model``, ``PeftModel`` ...) so that
code and adapter folders move between the two without change.
"""

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
from .save_load import get_peft_model_state_dict, set_peft_model_state_dict
from .tuners.lora import LoftQConfig, LoraConfig, LoraModel

register_tuner(PeftType.LORA.value, LoraModel)

__all__ = [
    "METHODS",
    "MODEL_TYPE_TO_PEFT_MODEL",
    "LoftQConfig",
    "LoraConfig",
    "LoraModel",
    "MethodSpec",
    "PeftConfig",
    "PeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForTokenClassification",
    "PeftType",
    "TaskType",
    "get_method",
    "get_peft_model",
    "get_peft_model_state_dict",
    "inject_adapter_in_model",
    "register_method",
    "set_peft_model_state_dict",
]
