"""LoKr's config: HF PEFT's ``LoKrConfig`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftType, check_bool, check_choice, register_config
from ..lycoris_config import LycorisConfig


@register_config
@dataclass
class LoKrConfig(LycorisConfig):
    """Low-rank Kronecker product: ``delta W = (alpha / r) * W1 ⊗ W2`` (W2, optionally W1, low-rank)."""

    PEFT_TYPE = PeftType.LOKR

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("init_weights", self.init_weights, (True, False, "lycoris"))
        check_bool(self, "decompose_both", "rank_dropout_scale")
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool) or (
            self.decompose_factor == 0 or self.decompose_factor < -1
        ):
            raise ValueError(f"decompose_factor={self.decompose_factor!r} is not allowed; allowed: -1 or an integer > 0")
