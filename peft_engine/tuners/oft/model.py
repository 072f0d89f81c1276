"""The OFT tuner: HF PEFT's defaults (LoRA's target table) and its layer kinds, bitsandbytes included."""

from __future__ import annotations

from ..base import BaseTuner, LayerFactory
from ..common import sync_fan_in_fan_out
from .layer import create_oft_layer


class OFTModel(BaseTuner):
    prefix = "oft_"
    layer_factories: list[LayerFactory] = [create_oft_layer]

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        sync_fan_in_fan_out(config, target)
        return super()._create_layer(target, adapter_name, config, name)
