"""LoHa's config: HF PEFT's ``LoHaConfig`` fields and defaults."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftType, check_bool, register_config
from ..lycoris_config import LycorisConfig


@register_config
@dataclass
class LoHaConfig(LycorisConfig):
    """Low-rank Hadamard product: ``delta W = (alpha / r) * (W1a W1b) ⊙ (W2a W2b)``."""

    PEFT_TYPE = PeftType.LOHA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "init_weights")
