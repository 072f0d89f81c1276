"""The BOFT tuner: LoRA's default targets; Linear, Conv1D, Conv2d and bitsandbytes linears."""

from __future__ import annotations

import copy
import warnings

import torch

from ..base import BaseTuner, LayerFactory
from ..common import sync_fan_in_fan_out
from .layer import BOFTLayer, create_boft_layer


class BOFTModel(BaseTuner):
    prefix = "boft_"
    layer_factories: list[LayerFactory] = [create_boft_layer]

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        sync_fan_in_fan_out(config, target)
        return super()._create_layer(target, adapter_name, config, name)

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *, what: str = "adapter file") -> None:
        """Files HF PEFT wrote without its CUDA extension hold one butterfly factor whatever the config says.

        HF PEFT then silently trains with ``boft_n_butterfly_factor=1``; such a file is loaded the
        same way (with a warning) instead of failing on the shape of ``boft_R``.
        """
        config = self.peft_config[adapter_name]
        single = any(k.endswith(".boft_R") and v.shape[0] == 1 for k, v in tensors.items())
        if single and config.boft_n_butterfly_factor > 1:
            warnings.warn(f"{what}: boft_R holds 1 butterfly factor but the config says "
                          f"{config.boft_n_butterfly_factor} (HF PEFT without its CUDA extension); using 1", stacklevel=2)
            build = copy.copy(config)
            build.boft_n_butterfly_factor = 1
            for name, layer in self.named_adapter_layers():
                if isinstance(layer, BOFTLayer) and adapter_name in layer.boft_R:
                    trainable = layer.boft_R[adapter_name].requires_grad
                    layer.update_layer(adapter_name, build, name)
                    layer.boft_R[adapter_name].requires_grad_(trainable)
                    layer.boft_s[adapter_name].requires_grad_(trainable)
        super().load_adapter_state_dict(tensors, adapter_name, what=what)
