"""AdaLoRA's config: HF PEFT's ``AdaLoraConfig`` (LoRA's fields plus the rank-budget schedule)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

from ...config import (
    ANY_VALUE,
    PeftConfig,
    PeftType,
    check_bool,
    check_choice,
    check_float,
    check_positive,
    normalise_targets,
    register_config,
)

# HF PEFT's defaults for target_modules=None (a subset of its table).
ADALORA_TARGETS: dict[str, list[str]] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"], "bloom": ["query_key_value"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj"],
    "bert": ["query", "value"], "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"], "gpt_bigcode": ["c_attn"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}


@register_config
@dataclass
class AdaLoraConfig(PeftConfig):
    """SVD-form LoRA ``W + B diag(E) A * alpha / r0`` whose total rank shrinks from ``init_r`` to ``target_r``.

    Training schedule (steps): ``tinit`` warm-up at full rank, then the budget falls cubically,
    re-allocated every ``deltaT`` steps by importance (smoothed with ``beta1`` / ``beta2``),
    and stays at ``target_r`` per layer on average for the last ``tfinal`` steps. ``total_step``
    is required. ``orth_reg_weight`` weighs the ||A A^T - I|| + ||B^T B - I|| regulariser.
    ``rank_pattern`` is written by training (which triplets survive) and read when loading.
    """

    PEFT_TYPE = PeftType.ADALORA
    UNSUPPORTED_FIELDS = {
        "megatron_config": None, "megatron_core": ANY_VALUE, "trainable_token_indices": None, "eva_config": None,
        "corda_config": None, "lora_ga_config": None, "velora_config": None, "alora_invocation_tokens": None,
        "use_qalora": False, "qalora_group_size": ANY_VALUE, "monteclora_config": None, "layer_replication": None,
        "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None, "kasa_config": None,
        "ensure_weight_tying": False, "runtime_config": ANY_VALUE,
    }

    r: int = 8  # unused by AdaLoRA (init_r is the starting rank), kept for HF PEFT's file format
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False  # accepted for the file format; AdaLoRA's scaling does not use it (as in HF PEFT)
    modules_to_save: list[str] | None = None
    init_lora_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    alpha_pattern: dict[str, Any] = field(default_factory=dict)
    loftq_config: dict[str, Any] = field(default_factory=dict)
    use_dora: bool = False
    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_dora:
            raise ValueError("use_dora=True is not allowed for AdaLoRA; allowed: false")
        if self.loftq_config:
            raise ValueError(f"loftq_config={self.loftq_config!r} is not allowed for AdaLoRA; allowed: {{}}")
        if self.r != 8:
            warnings.warn("AdaLoRA ignores r; set init_r for the starting rank", stacklevel=3)
        check_positive("init_r", self.init_r, integer=True)
        check_positive("target_r", self.target_r, integer=True)
        check_positive("lora_alpha", self.lora_alpha, allow_zero=True)
        check_float("lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_choice("bias", self.bias, ("none", "all", "lora_only"))
        check_bool(self, "fan_in_fan_out", "use_rslora", "init_lora_weights", "inference_mode")
        for name in ("tinit", "tfinal"):
            check_positive(name, getattr(self, name), allow_zero=True, integer=True)
        check_positive("deltaT", self.deltaT, integer=True)
        check_float("beta1", self.beta1, 0.0, 1.0)
        check_float("beta2", self.beta2, 0.0, 1.0)
        if self.beta1 == 0 or self.beta2 == 0:
            raise ValueError(f"beta1={self.beta1}, beta2={self.beta2}: allowed: numbers in (0, 1)")
        check_positive("orth_reg_weight", self.orth_reg_weight, allow_zero=True)
        if self.total_step is None or isinstance(self.total_step, bool) or not isinstance(self.total_step, int) \
                or self.total_step <= 0:
            raise ValueError(f"total_step={self.total_step!r} is not allowed; allowed: the number of training steps "
                             "(an integer > 0) — AdaLoRA's rank schedule needs it")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={self.total_step} leave no "
                             "budgeting phase; allowed: tinit < total_step - tfinal")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used with a regex target_modules; allowed: a list of names")
        normalise_targets(self)
