"""LoRA's config: HF PEFT's ``LoraConfig`` fields and defaults, validated on creation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...config import (
    PeftConfig,
    PeftType,
    any_value,
    check_choice,
    check_positive,
    check_rank_alpha_patterns,
    pattern_value,
    register_config,
)

INIT_CHOICES = (True, False, "gaussian", "pissa", "olora", "loftq")
BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoftQConfig:
    """LoftQ initialisation: alternate ``loftq_iter`` times between quantising the residual and an SVD."""

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_choice("loftq_config.loftq_bits", self.loftq_bits, (2, 4, 8))
        check_positive("loftq_config.loftq_iter", self.loftq_iter, integer=True)


@register_config
@dataclass
class LoraConfig(PeftConfig):
    """Low-rank adaptation: ``W x + (alpha / r) * B A x`` with A (r x in) and B (out x r)."""

    PEFT_TYPE = PeftType.LORA
    UNSUPPORTED_FIELDS = {
        "megatron_config": None,
        "megatron_core": any_value("megatron.core"),
        "trainable_token_indices": None,
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "qalora_group_size": any_value(16),
        "monteclora_config": None,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
        "use_bdlora": None,
        "arrow_config": None,
        "kasa_config": None,
        "ensure_weight_tying": False,
    }

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    loftq_config: dict[str, Any] | LoftQConfig = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r, integer=True)
        check_positive("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is not allowed; allowed: a number in [0, 1)")
        check_choice("bias", self.bias, BIAS_CHOICES)
        check_choice("init_lora_weights", self.init_lora_weights, INIT_CHOICES)
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; allowed: true, false")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.layers_to_transform is not None and self.target_modules is not None and isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError("layers_to_transform cannot be used with a regex target_modules; allowed: a list of names")
        if self.layers_pattern is not None and self.layers_to_transform is None:
            raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too")
        if isinstance(self.loftq_config, LoftQConfig):
            self.loftq_config = {"loftq_bits": self.loftq_config.loftq_bits, "loftq_iter": self.loftq_config.loftq_iter}
        elif self.loftq_config:
            LoftQConfig(**self.loftq_config)  # validate
        if self.init_lora_weights == "loftq" and not self.loftq_config:
            raise ValueError("init_lora_weights='loftq' needs loftq_config (e.g. LoftQConfig(loftq_bits=4))")
        check_rank_alpha_patterns(self)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        """Per-module rank and alpha: the first pattern whose regex matches the name's end wins."""
        return (
            pattern_value(self.rank_pattern, module_name, self.r),
            pattern_value(self.alpha_pattern, module_name, self.lora_alpha),
        )
