"""The LoKr tuner: LoRA's default targets, Linear / Conv1D / Conv1d / Conv2d layers."""

from __future__ import annotations

from ..base import BaseTuner, LayerFactory
from .layer import create_lokr_layer


class LoKrModel(BaseTuner):
    prefix = "lokr_"
    layer_factories: list[LayerFactory] = [create_lokr_layer]
