"""BOFT's config: HF PEFT's ``BOFTConfig`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import (
    PeftConfig,
    PeftType,
    check_bool,
    check_choice,
    check_float,
    check_positive,
    normalise_targets,
    register_config,
)


@register_config
@dataclass
class BOFTConfig(PeftConfig):
    """Butterfly orthogonal fine-tuning: OFT whose rotation is a product of permuted block-diagonal factors.

    Exactly one of ``boft_block_size`` and ``boft_block_num`` is non-zero.
    ``boft_n_butterfly_factor`` = 1 is plain block-diagonal OFT; each extra factor doubles the
    span of the rotation. (HF PEFT silently falls back to 1 factor when its CUDA extension is
    missing, e.g. on every CPU; this engine always uses the configured number.)
    """

    PEFT_TYPE = PeftType.BOFT

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("boft_block_size", self.boft_block_size, allow_zero=True, integer=True)
        check_positive("boft_block_num", self.boft_block_num, allow_zero=True, integer=True)
        check_positive("boft_n_butterfly_factor", self.boft_n_butterfly_factor, integer=True)
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"boft_block_size={self.boft_block_size} and boft_block_num={self.boft_block_num}: set exactly one "
                "of them to a positive integer and the other to 0 (block size x block count == layer width)"
            )
        check_float("boft_dropout", self.boft_dropout, 0.0, 1.0)
        check_choice("bias", self.bias, ("none", "all", "boft_only"))
        check_bool(self, "fan_in_fan_out", "init_weights", "inference_mode")
        normalise_targets(self)
