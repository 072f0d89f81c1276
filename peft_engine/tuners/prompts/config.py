"""Configs of the prompt-learning methods and of adaption prompts, with HF PEFT's fields and defaults.

Prompt learning leaves the base model's weights alone and learns inputs instead: virtual token
embeddings (prompt tuning, P-tuning, multitask prompt tuning) or per-layer key/value prefixes
(prefix tuning). The shape fields (``token_dim``, ``num_layers`` ...) may be left ``None``: they
are read from the base model's config when the adapter is created, and saved filled in, as HF
PEFT does, so a file describes its tensors without the model at hand.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any

from ...config import PeftConfig, PeftType, TaskType, check_choice, check_positive, register_config

# Task types whose forward a prompt-learning adapter knows how to extend.
PROMPT_TASKS = (TaskType.CAUSAL_LM.value, TaskType.SEQ_2_SEQ_LM.value, TaskType.SEQ_CLS.value,
                TaskType.FEATURE_EXTRACTION.value)


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


def _optional_positive(name: str, value: Any) -> None:
    if value is not None:
        check_positive(name, value, integer=True)


def _enum_value(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


@dataclass
class PromptLearningConfig(PeftConfig):
    """Fields every prompt-learning method shares (HF PEFT's ``PromptLearningConfig``)."""

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # None only as a placeholder HF PEFT also writes; a prompt needs at least one token.
        check_positive("num_virtual_tokens", self.num_virtual_tokens, integer=True)
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            _optional_positive(name, getattr(self, name))
        if self.num_transformer_submodules is not None:
            check_choice("num_transformer_submodules", self.num_transformer_submodules, (1, 2))
        if self.task_type is not None:
            check_choice("task_type", self.task_type, PROMPT_TASKS)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, (list, tuple)) or not all(isinstance(m, str) for m in self.modules_to_save)
        ):
            raise ValueError(f"modules_to_save={self.modules_to_save!r} is not allowed; allowed: a list of module names")

    @property
    def is_prompt_learning(self) -> bool:
        return True


@register_config
@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` trainable input embeddings put before the real ones.

    ``prompt_tuning_init="TEXT"`` starts them at the embeddings of ``prompt_tuning_init_text``;
    ``tokenizer_name_or_path`` is a local tokenizer folder or a tokenizer object (never a Hub id:
    this engine does not download). ``SAMPLE_VOCAB`` starts them at random vocabulary rows.
    """

    PEFT_TYPE = PeftType.PROMPT_TUNING
    INIT_CHOICES = tuple(i.value for i in PromptTuningInit)

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: Any = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompt_tuning_init = _enum_value(self.prompt_tuning_init)
        check_choice("prompt_tuning_init", self.prompt_tuning_init, self.INIT_CHOICES)
        if self.prompt_tuning_init == "TEXT":
            if not self.tokenizer_name_or_path:
                raise ValueError("tokenizer_name_or_path=None is not allowed with prompt_tuning_init='TEXT'; "
                                 "allowed: a local tokenizer folder or a tokenizer object")
            if not isinstance(self.prompt_tuning_init_text, str) or not self.prompt_tuning_init_text:
                raise ValueError(f"prompt_tuning_init_text={self.prompt_tuning_init_text!r} is not allowed with "
                                 "prompt_tuning_init='TEXT'; allowed: a non-empty string")
        elif self.tokenizer_kwargs:
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is not allowed with "
                             f"prompt_tuning_init={self.prompt_tuning_init!r}; allowed: only with 'TEXT'")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tok = self.tokenizer_name_or_path
        if tok is not None and not isinstance(tok, (str, os.PathLike)):
            # A tokenizer object cannot go in JSON: record where it came from (informative only;
            # loading a saved adapter never re-reads the tokenizer).
            out["tokenizer_name_or_path"] = getattr(tok, "name_or_path", None) or None
        elif isinstance(tok, os.PathLike):
            out["tokenizer_name_or_path"] = os.fspath(tok)
        return out


@register_config
@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: trainable key/value prefixes of ``num_virtual_tokens`` for every attention layer.

    With ``prefix_projection`` the prefixes are produced by a two-layer MLP (hidden size
    ``encoder_hidden_size``) from ``num_virtual_tokens`` embeddings while training; files hold
    the resulting prefixes, as in HF PEFT.
    """

    PEFT_TYPE = PeftType.PREFIX_TUNING

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("init_weights", self.init_weights, (None, "zero"))
        _optional_positive("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r} is not allowed; allowed: True, False")


@register_config
@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual token embeddings produced by an MLP or a bidirectional LSTM + MLP encoder."""

    PEFT_TYPE = PeftType.P_TUNING

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.encoder_reparameterization_type = _enum_value(self.encoder_reparameterization_type)
        check_choice("encoder_reparameterization_type", self.encoder_reparameterization_type,
                     tuple(t.value for t in PromptEncoderReparameterizationType))
        _optional_positive("encoder_hidden_size", self.encoder_hidden_size)
        check_positive("encoder_num_layers", self.encoder_num_layers, integer=True)
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) \
                or not 0.0 <= self.encoder_dropout < 1.0:
            raise ValueError(f"encoder_dropout={self.encoder_dropout!r} is not allowed; allowed: a number in [0, 1)")


@register_config
@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning: a shared prompt scaled per task by a rank-``num_ranks`` product.

    The forward needs ``task_ids`` (one task index per example) unless ``num_tasks == 1``.
    Source-task initialisations read ``prompt_tuning_init_state_dict_path`` (safetensors only).
    """

    PEFT_TYPE = PeftType.MULTITASK_PROMPT_TUNING
    INIT_CHOICES = tuple(i.value for i in MultitaskPromptTuningInit)

    prompt_tuning_init: str = MultitaskPromptTuningInit.RANDOM.value
    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("num_tasks", self.num_tasks, integer=True)
        check_positive("num_ranks", self.num_ranks, integer=True)
        check_positive("prompt_tuning_init_task", self.prompt_tuning_init_task, allow_zero=True, integer=True)
        if self.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED") \
                and not self.prompt_tuning_init_state_dict_path:
            raise ValueError(f"prompt_tuning_init_state_dict_path=None is not allowed with prompt_tuning_init="
                             f"{self.prompt_tuning_init!r}; allowed: the path of a source adapter's .safetensors")


@register_config
@dataclass
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter: ``adapter_len`` learned prompt tokens attended to by the top ``adapter_layers``
    attention modules through a zero-initialised gate, so training starts from the base model.

    ``target_modules`` is the attention submodule name (``self_attn`` for Llama/Mistral, ``attn``
    for GPT-2); left ``None`` it is taken from the model type.
    """

    PEFT_TYPE = PeftType.ADAPTION_PROMPT

    target_modules: str | None = None
    adapter_len: int | None = None
    adapter_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("adapter_len", self.adapter_len, integer=True)
        check_positive("adapter_layers", self.adapter_layers, integer=True)
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError(f"target_modules={self.target_modules!r} is not allowed; allowed: None or the name "
                             "of the attention submodule (a string such as 'self_attn')")

    @property
    def is_adaption_prompt(self) -> bool:
        return True
