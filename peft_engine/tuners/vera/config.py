"""VeRA's config: HF PEFT's ``VeraConfig`` fields and defaults."""

from __future__ import annotations

import warnings
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
class VeraConfig(PeftConfig):
    """Vector-based random matrix adaptation: ``delta W = diag(b) B diag(d) A``.

    A (r x in) and B (out x r) are frozen random matrices shared by every layer, drawn from
    ``projection_prng_key``; only the vectors d (r) and b (out) train. ``save_projection``
    stores A and B in the adapter file so loading does not depend on the random generator.
    """

    PEFT_TYPE = PeftType.VERA

    r: int = 256
    target_modules: list[str] | str | None = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: list[str] | None = None
    init_weights: bool = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("r", self.r, integer=True)
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ValueError(f"projection_prng_key={self.projection_prng_key!r} is not allowed; allowed: an integer")
        check_float("vera_dropout", self.vera_dropout, 0.0, 1.0)
        if not isinstance(self.d_initial, (int, float)) or isinstance(self.d_initial, bool):
            raise ValueError(f"d_initial={self.d_initial!r} is not allowed; allowed: a number")
        check_choice("bias", self.bias, ("none", "all", "vera_only"))
        check_bool(self, "save_projection", "fan_in_fan_out", "init_weights", "inference_mode")
        normalise_targets(self)
        if not self.save_projection:
            warnings.warn("save_projection=False: vera_A / vera_B will be regenerated from projection_prng_key when "
                          "loading, which may differ across platforms", stacklevel=3)
