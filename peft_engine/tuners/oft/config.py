"""OFT's config: HF PEFT's ``OFTConfig`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
class OFTConfig(PeftConfig):
    """Orthogonal fine-tuning: the layer input is rotated by a block-diagonal orthogonal matrix.

    Exactly one of ``r`` (number of blocks) and ``oft_block_size`` is non-zero; the other
    follows from the layer width. Blocks are Cayley transforms of skew-symmetric matrices,
    by default through a truncated Neumann series (``use_cayley_neumann``).
    """

    PEFT_TYPE = PeftType.OFT

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: list[str] | str | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r, allow_zero=True, integer=True)
        check_positive("oft_block_size", self.oft_block_size, allow_zero=True, integer=True)
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"r={self.r} and oft_block_size={self.oft_block_size}: set exactly one of them to a positive "
                "integer and the other to 0 (r x oft_block_size == layer width)"
            )
        check_float("module_dropout", self.module_dropout, 0.0, 1.0)
        check_choice("bias", self.bias, ("none", "all", "oft_only"))
        check_positive("eps", self.eps)
        check_positive("num_cayley_neumann_terms", self.num_cayley_neumann_terms, integer=True)
        check_bool(self, "fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann", "inference_mode")
        normalise_targets(self)

    @classmethod
    def _from_known_keys(cls, data: dict[str, Any]) -> PeftConfig:
        if "oft_block_size" not in data:
            raise ValueError(
                "this OFT adapter was written by HF PEFT < 0.14 (no 'oft_block_size'); its weights use an older "
                "parametrisation that peft_engine does not read — retrain it with a current version"
            )
        return super()._from_known_keys(data)
