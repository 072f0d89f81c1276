"""The config fields LoHa and LoKr (the LyCORIS family) share, with HF PEFT's names and defaults.

Kept apart from :mod:`.lycoris` (their layers) so that configs are read and validated without
importing torch, as a sweep's driver does before any Ray resource starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (
    PeftConfig,
    check_bool,
    check_float,
    check_positive,
    check_rank_alpha_patterns,
    normalise_targets,
    pattern_value,
)


@dataclass
class LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share, with HF PEFT's names and defaults."""

    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r, integer=True)
        check_positive("alpha", self.alpha, allow_zero=True)
        check_float("rank_dropout", self.rank_dropout, 0.0, 1.0)
        check_float("module_dropout", self.module_dropout, 0.0, 1.0)
        check_bool(self, "use_effective_conv2d", "inference_mode")
        normalise_targets(self)
        check_rank_alpha_patterns(self)

    def rank_and_alpha(self, module_name: str) -> tuple[int, float]:
        return pattern_value(self.rank_pattern, module_name, self.r), pattern_value(self.alpha_pattern, module_name, self.alpha)
