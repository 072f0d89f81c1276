"""The LoHa tuner: LoRA's default targets, Linear / Conv1D / Conv1d / Conv2d layers."""

from __future__ import annotations

from ..base import BaseTuner, LayerFactory
from .layer import create_loha_layer


class LoHaModel(BaseTuner):
    prefix = "hada_"
    layer_factories: list[LayerFactory] = [create_loha_layer]
