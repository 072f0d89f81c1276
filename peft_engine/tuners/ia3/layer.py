"""(IA)³ layers: a learned vector ``l`` rescales the output (``y = l ⊙ W x``) or, for
feed-forward layers, the input (``y = W (l ⊙ x)``).

Several active adapters multiply their vectors. Merging folds ``l`` into the weight (rows for
output scaling, columns for input scaling) and, for output scaling, into the bias; unmerging
divides again (exact up to rounding, with HF PEFT's 1e-8 guard against division by zero).
Works on nn.Linear, transformers Conv1D, nn.Conv2d / Conv3d and bitsandbytes linear layers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...targets import Conv1D
from ..common import ComposedMethodLayer, in_out_features, is_linear_like
from .config import IA3Config


class IA3Layer(ComposedMethodLayer):
    adapter_layer_names = ("ia3_l",)

    def __init__(self, base_layer: nn.Module, is_feedforward: bool) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward = is_feedforward
        base = self.get_base_layer()
        self.is_conv = isinstance(base, (nn.Conv2d, nn.Conv3d))
        self.fan_in_fan_out = isinstance(base, Conv1D)  # weight stored (in, out)
        self.in_features, self.out_features = in_out_features(base)

    def update_layer(self, adapter_name: str, config: IA3Config, module_name: str) -> None:
        size = self.in_features if self.is_feedforward else self.out_features
        if self.is_conv:
            shape: tuple[int, ...] = (1, size) + (1,) * (self.get_base_layer().weight.dim() - 2)
        else:
            shape = (1, size) if self.is_feedforward else (size, 1)
        device, dtype = self.base_device_dtype()
        init = torch.ones(shape) if config.init_ia3_weights else torch.randn(shape)
        self.ia3_l[adapter_name] = nn.Parameter(init.to(device, dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    # ---- forward ----------------------------------------------------------------------------
    def scale(self, names: Sequence[str]) -> torch.Tensor | None:
        """Product of the named vectors, shaped to broadcast against the input or output."""
        scale = None
        for name in names:
            if name in self.ia3_l:
                vector = self.ia3_l[name] if self.is_conv else self.ia3_l[name].flatten()
                scale = vector if scale is None else scale * vector
        return scale

    def _apply(self, names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        scale = self.scale(names)
        if scale is None:
            return self.base_layer(x, *args, **kwargs)
        if self.is_feedforward:
            return self.base_layer((x.to(scale.dtype) * scale).to(x.dtype), *args, **kwargs)
        out = self.base_layer(x, *args, **kwargs)
        return (out * scale).to(out.dtype)

    # ---- merging ----------------------------------------------------------------------------
    def weight_scale(self, adapter_name: str) -> torch.Tensor:
        """``l`` shaped to multiply the stored base weight."""
        vector = self.ia3_l[adapter_name].detach()
        if not self.is_conv:
            return vector.T if self.fan_in_fan_out else vector
        if not self.is_feedforward:
            return vector.transpose(0, 1)  # (out, 1, 1, ...)
        base = self.get_base_layer()
        if base.groups == 1:
            return vector  # (1, in, 1, ...)
        per_group_in, per_group_out = base.in_channels // base.groups, base.out_channels // base.groups
        grouped = vector.reshape(base.groups, 1, per_group_in, *vector.shape[2:])
        grouped = grouped.expand(base.groups, per_group_out, per_group_in, *vector.shape[2:])
        return grouped.reshape(base.out_channels, per_group_in, *vector.shape[2:])

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight * self.weight_scale(adapter_name)).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return (weight / (self.weight_scale(adapter_name) + 1e-8)).to(weight.dtype)

    def _scale_bias(self, adapter_name: str, *, undo: bool) -> None:
        bias = getattr(self.get_base_layer(), "bias", None)
        if self.is_feedforward or bias is None:
            return
        vector = self.ia3_l[adapter_name].detach().reshape(bias.shape)
        new = bias.data / (vector + 1e-8) if undo else bias.data * vector
        bias.data = new.to(bias.dtype)

    def merge(self, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        before = list(self.merged_adapters)
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        for name in self.merged_adapters[len(before):]:
            self._scale_bias(name, undo=False)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.set_base_weight(self.unmerged_weight(name, self.get_base_weight()))
            self._scale_bias(name, undo=True)


def is_feedforward(config: IA3Config, module_name: str) -> bool:
    """HF PEFT's test: a regex full match, or a name that ends with one of the listed names."""
    ff = config.feedforward_modules
    if ff is None:
        return False
    if isinstance(ff, str):
        return re.fullmatch(ff, module_name) is not None
    return any(module_name.endswith(name) for name in ff)


def create_ia3_layer(target: nn.Module, adapter_name: str, config: IA3Config, module_name: str) -> IA3Layer | None:
    if not (is_linear_like(target) or isinstance(target, (nn.Conv2d, nn.Conv3d))):
        return None
    layer = IA3Layer(target, is_feedforward(config, module_name))
    layer.update_layer(adapter_name, config, module_name)
    return layer
