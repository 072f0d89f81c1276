"""``PeftModel``: a base model with named adapters, and the task wrappers HF PEFT users know.

``PeftModel.base_model`` is the method's tuner and ``base_model.model`` the transformers
model, so state-dict keys read ``base_model.model.<module path>...`` exactly as in HF PEFT.
Task wrappers differ in what they add on top: classification wrappers train their heads
(``modules_to_save``) by default; prompt-learning methods bring their own forward.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig, PeftType, TaskType
from .save_load import get_peft_model_state_dict, load_adapter_file, save_adapter_file

TUNERS: dict[str, type[nn.Module]] = {}  # peft_type -> tuner class; the built-in ones are at the end


def register_tuner(peft_type: str, tuner_cls: type[nn.Module]) -> None:
    TUNERS[peft_type] = tuner_cls


class PeftModel(nn.Module):
    """A transformers model with one or more adapters of one method."""

    # Heads that a task trains as whole modules unless the user says otherwise.
    auto_modules_to_save: tuple[str, ...] = ()

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        peft_config = self._with_task_heads(model, peft_config)
        if peft_config.base_model_name_or_path is None:
            # HF PEFT writes null, not "", for a model built from a config
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        if peft_config.peft_type not in TUNERS:
            raise ValueError(f"peft_type={peft_config.peft_type!r} has no tuner; allowed: {', '.join(sorted(TUNERS))}")
        self.base_model = TUNERS[peft_config.peft_type](model, peft_config, adapter_name)

    def _with_task_heads(self, model: nn.Module, config: PeftConfig) -> PeftConfig:
        # Prompt-learning configs get the heads too: HF PEFT trains and saves them for every method.
        if not self.auto_modules_to_save or not hasattr(config, "modules_to_save"):
            return config
        present = {name.split(".")[-1] for name, _ in model.named_modules()}
        # HF PEFT lists every head name of the task (classifier *and* score), so the saved config
        # reads the same; nothing is added for a model with none of them.
        heads = list(self.auto_modules_to_save) if present & set(self.auto_modules_to_save) else []
        wanted = list(config.modules_to_save or [])
        extra = [h for h in heads if h not in wanted]
        if not extra:
            return config
        config = copy.copy(config)
        config.modules_to_save = wanted + extra
        return config

    # ---- passthrough ----------------------------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self.base_model.batch_adapters(adapter_names):
            return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        with self.base_model.batch_adapters(adapter_names):
            return self.base_model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # ---- adapters -------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        existing = next(iter(self.peft_config.values()))
        if peft_config.peft_type != existing.peft_type:
            raise ValueError(
                f"cannot add a {peft_config.peft_type} adapter to a {existing.peft_type} model; "
                "use get_peft_model(..., mixed=True) for mixed adapter types"
            )
        self.base_model.inject_adapter(adapter_name, self._with_task_heads(self.base_model.model, peft_config))

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        self.base_model.delete_adapter(adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside the block (merged adapters are unmerged first)."""
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for param in self.parameters():
            count = param.numel()
            # bitsandbytes packs two 4-bit values per byte: count the logical weights.
            if param.__class__.__name__ == "Params4bit":
                count *= 2
            total += count
            if param.requires_grad:
                trainable += count
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- files ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        save_embedding_layers: bool | str = "auto", is_main_process: bool = True, **_: Any) -> None:
        """Write ``adapter_config.json`` + ``adapter_model.safetensors`` per adapter.

        The ``default`` adapter goes in ``save_directory``; others in ``save_directory/<name>``,
        as HF PEFT lays them out.
        """
        if not is_main_process:
            return
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; adapters: {list(self.peft_config)}")
        for name in names:
            folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(folder, exist_ok=True)
            tensors = get_peft_model_state_dict(self, adapter_name=name, save_embedding_layers=save_embedding_layers)
            save_adapter_file(tensors, os.path.join(folder, WEIGHTS_NAME))
            config = copy.copy(self.peft_config[name])
            config.inference_mode = True
            base_cls = type(getattr(self.base_model, "model", self.base_model))
            auto_mapping = None if config.task_type else {"base_model_class": base_cls.__name__,
                                                          "parent_library": base_cls.__module__}
            config.save_pretrained(folder, auto_mapping_dict=auto_mapping)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **_: Any) -> PeftModel:
        """Load a saved adapter (ours or HF PEFT's) onto ``model``."""
        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        wrapper = cls if cls is not PeftModel else MODEL_TYPE_TO_PEFT_MODEL.get(config.task_type or "", PeftModel)
        peft_model = wrapper(model, _loading_config(config), adapter_name)
        peft_model.peft_config[adapter_name] = config
        peft_model._load_weights(model_id, adapter_name)
        if not is_trainable:
            peft_model.base_model.set_adapter(adapter_name, trainable=False)
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **_: Any) -> None:
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        self.add_adapter(adapter_name, _loading_config(config))
        self.peft_config[adapter_name] = config
        self._load_weights(model_id, adapter_name)
        if is_trainable:  # as in HF PEFT: trainable now, even when it is not the active adapter
            self.base_model.set_adapter_trainable(adapter_name)

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str) -> None:
        path = os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(model_id, "adapter_model.bin")):
                raise ValueError(f"{model_id}: only a pickled adapter_model.bin is there; peft_engine loads safetensors only")
            raise FileNotFoundError(f"no {WEIGHTS_NAME} next to {CONFIG_NAME} in {model_id}")
        device = next(self.base_model.model.parameters()).device
        tensors = load_adapter_file(path, device=device)
        self.base_model.load_adapter_state_dict(tensors, adapter_name, what=path)


def _loading_config(config: PeftConfig) -> PeftConfig:
    """The config to build layers with before their weights are loaded.

    LoRA inits that rewrite the base weight (PiSSA, OLoRA, LoftQ) DO run again, as in HF PEFT: such a
    file holds A and B for the residual base ``W - s B0 A0``, which the init rebuilds from the
    original W (HF PEFT's converted files, meant for an untouched base, say init_lora_weights=true).
    """
    if getattr(config, "prompt_tuning_init", "RANDOM") != "RANDOM":
        # The file supplies the prompt: no tokenizer or source-task file is read to initialise it.
        build = copy.copy(config)
        build.prompt_tuning_init = "RANDOM"
        return build
    return config


class PeftModelForCausalLM(PeftModel):
    pass


class PeftModelForSeq2SeqLM(PeftModel):
    pass


class PeftModelForSequenceClassification(PeftModel):
    auto_modules_to_save = ("classifier", "score")


class PeftModelForTokenClassification(PeftModel):
    auto_modules_to_save = ("classifier", "score")


class PeftModelForQuestionAnswering(PeftModel):
    auto_modules_to_save = ("qa_outputs",)


class PeftModelForFeatureExtraction(PeftModel):
    pass


MODEL_TYPE_TO_PEFT_MODEL: dict[str, type[PeftModel]] = {
    TaskType.CAUSAL_LM.value: PeftModelForCausalLM,
    TaskType.SEQ_2_SEQ_LM.value: PeftModelForSeq2SeqLM,
    TaskType.SEQ_CLS.value: PeftModelForSequenceClassification,
    TaskType.TOKEN_CLS.value: PeftModelForTokenClassification,
    TaskType.QUESTION_ANS.value: PeftModelForQuestionAnswering,
    TaskType.FEATURE_EXTRACTION.value: PeftModelForFeatureExtraction,
}


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default", mixed: bool = False,
                   **_: Any) -> PeftModel:
    """Wrap ``model`` with a new adapter, picking the task wrapper from ``peft_config.task_type``.

    ``mixed=True`` returns a :class:`~peft_engine.mixed.PeftMixedModel`, which takes adapters of
    different methods (LoRA, LoHa, LoKr, OFT, AdaLoRA) side by side.
    """
    if mixed:
        from .mixed import PeftMixedModel

        return PeftMixedModel(model, peft_config, adapter_name)  # type: ignore[return-value]
    wrapper = MODEL_TYPE_TO_PEFT_MODEL.get(peft_config.task_type or "", PeftModel)
    return wrapper(model, peft_config, adapter_name)


def inject_adapter_in_model(peft_config: PeftConfig, model: nn.Module, adapter_name: str = "default") -> nn.Module:
    """Insert adapter layers into ``model`` in place and return it (no PeftModel wrapper)."""
    tuner = TUNERS[peft_config.peft_type](model, peft_config, adapter_name)
    return tuner.model


def _register_builtin_tuners() -> None:
    from .tuners.adalora.model import AdaLoraModel
    from .tuners.boft.model import BOFTModel
    from .tuners.ia3.model import IA3Model
    from .tuners.loha.model import LoHaModel
    from .tuners.lokr.model import LoKrModel
    from .tuners.lora.model import LoraModel
    from .tuners.oft.model import OFTModel
    from .tuners.prompts.adaption_prompt import AdaptionPromptModel
    from .tuners.prompts.tuner import PromptLearningModel
    from .tuners.vera.model import VeraModel

    for peft_type, tuner in (
        (PeftType.LORA, LoraModel), (PeftType.ADALORA, AdaLoraModel), (PeftType.BOFT, BOFTModel),
        (PeftType.IA3, IA3Model), (PeftType.LOHA, LoHaModel), (PeftType.LOKR, LoKrModel), (PeftType.OFT, OFTModel),
        (PeftType.VERA, VeraModel), (PeftType.ADAPTION_PROMPT, AdaptionPromptModel),
        (PeftType.PROMPT_TUNING, PromptLearningModel), (PeftType.PREFIX_TUNING, PromptLearningModel),
        (PeftType.P_TUNING, PromptLearningModel), (PeftType.MULTITASK_PROMPT_TUNING, PromptLearningModel),
    ):
        register_tuner(peft_type.value, tuner)


_register_builtin_tuners()
