"""VeRA layers: ``y = W x + b ⊙ (B[:out] (d ⊙ (A[:, :in] x)))``.

A and B are the tuner's shared frozen projections, sized for the widest wrapped layer and
sliced per layer; a layer only keeps a (non-registered) handle to them, so they are stored
once in the state dict, under the tuner, as HF PEFT does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...targets import Conv1D
from ..common import MethodLayer, in_out_features, is_linear_like
from .config import VeraConfig


class Projections(nn.Module):
    """Frozen per-adapter matrices kept as buffers (HF PEFT's ``BufferDict``)."""

    def __init__(self, persistent: bool) -> None:
        super().__init__()
        self.persistent = persistent

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def __setitem__(self, name: str, tensor: torch.Tensor) -> None:
        self.register_buffer(name, tensor, persistent=self.persistent)

    def __contains__(self, name: object) -> bool:
        return name in self._buffers

    def pop(self, name: str) -> None:
        self._buffers.pop(name, None)


class VeraLayer(MethodLayer):
    adapter_layer_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base_layer: nn.Module, vera_A: Projections, vera_B: Projections) -> None:
        super().__init__(base_layer)
        self.vera_lambda_b = nn.ParameterDict()
        self.vera_lambda_d = nn.ParameterDict()
        self.vera_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        # Plain references, not submodules: the tuner owns (and saves, and moves) the projections.
        self.__dict__["vera_A"], self.__dict__["vera_B"] = vera_A, vera_B
        self.fan_in_fan_out = isinstance(self.get_base_layer(), Conv1D)
        self.in_features, self.out_features = in_out_features(self.get_base_layer())

    def update_layer(self, adapter_name: str, config: VeraConfig, module_name: str) -> None:
        a, b = self.vera_A[adapter_name], self.vera_B[adapter_name]
        if a.shape[1] < self.in_features or b.shape[0] < self.out_features or a.shape[0] < config.r:
            raise ValueError(f"{module_name}: the shared VeRA projections {tuple(a.shape)} / {tuple(b.shape)} are too "
                             f"small for in={self.in_features}, out={self.out_features}, r={config.r}")
        self.r[adapter_name] = config.r
        self.vera_dropout[adapter_name] = nn.Dropout(config.vera_dropout) if config.vera_dropout > 0 else nn.Identity()
        lambda_d = torch.randn(config.r)
        lambda_b = torch.ones(self.out_features)
        if config.init_weights:
            lambda_d.fill_(config.d_initial)
            lambda_b.zero_()
        device, dtype = self.base_device_dtype()
        self.vera_lambda_b[adapter_name] = nn.Parameter(lambda_b.to(device, dtype))
        self.vera_lambda_d[adapter_name] = nn.Parameter(lambda_d.to(device, dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        self.r.pop(adapter_name, None)
        if adapter_name in self.vera_dropout:
            del self.vera_dropout[adapter_name]

    def _sliced(self, adapter_name: str, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.vera_A[adapter_name][: self.r[adapter_name], : self.in_features]
        b = self.vera_B[adapter_name][: self.out_features, : self.r[adapter_name]]
        return a.to(like.device, like.dtype), b.to(like.device, like.dtype)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        a, b = self._sliced(adapter_name, lambda_d)
        delta = (lambda_b[:, None] * b) @ (lambda_d[:, None] * a)
        return delta.T if self.fan_in_fan_out else delta

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        lambda_d, lambda_b = self.vera_lambda_d[adapter_name], self.vera_lambda_b[adapter_name]
        a, b = self._sliced(adapter_name, lambda_d)
        x = self.vera_dropout[adapter_name](x.to(lambda_d.dtype))
        update = lambda_b * F.linear(lambda_d * F.linear(x, a), b)
        return result + update.to(result.dtype)


def create_vera_layer(target: nn.Module, adapter_name: str, config: VeraConfig, module_name: str,
                      vera_A: Projections, vera_B: Projections) -> VeraLayer | None:
    if not is_linear_like(target):
        return None
    layer = VeraLayer(target, vera_A, vera_B)
    layer.update_layer(adapter_name, config, module_name)
    return layer
