"""AdaLoRA layers: LoRA in SVD form, ``y = W x + B (E ⊙ (A x)) * s / r0``.

A (r x in) holds right singular vectors, B (out x r) left ones, E (r x 1) the singular
values; pruning a rank means zeroing its E (training) or dropping its row of A, entry of E
and column of B (loading a pruned file). ``s`` is ``lora_alpha`` (or r if alpha is 0) and r0
(``ranknum``) stays the initial rank even after pruning, so outputs do not jump. ranknum is
not saved (HF PEFT does not save it either).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...targets import Conv1D
from ..common import MethodLayer, in_out_features, is_linear_like
from .config import AdaLoraConfig


class AdaLoraLayer(MethodLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_E")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.ranknum: dict[str, float] = {}
        base = self.get_base_layer()
        self.is_conv = isinstance(base, nn.Conv2d)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = in_out_features(base)
        if self.is_conv and base.groups > 1:
            raise ValueError(f"AdaLoRA does not support Conv2d with groups={base.groups}; allowed: groups 1")
        self.flat_in = self.in_features * (base.kernel_size[0] * base.kernel_size[1] if self.is_conv else 1)

    def update_layer(self, adapter_name: str, config: AdaLoraConfig, module_name: str, rank: int | None = None) -> None:
        r = config.init_r if rank is None else rank
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = config.lora_alpha
        self.scaling[adapter_name] = config.lora_alpha if config.lora_alpha > 0 else float(r)
        self.ranknum.setdefault(adapter_name, float(r))
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        a, e, b = torch.randn(r, self.flat_in), torch.randn(r, 1), torch.randn(self.out_features, r)
        if config.init_lora_weights:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        device, dtype = self.base_device_dtype()
        self.lora_A[adapter_name] = nn.Parameter(a.to(device, dtype))
        self.lora_E[adapter_name] = nn.Parameter(e.to(device, dtype))
        self.lora_B[adapter_name] = nn.Parameter(b.to(device, dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.ranknum):
            table.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    @torch.no_grad()
    def keep_ranks(self, adapter_name: str, keep: torch.Tensor) -> None:
        """Drop the triplets where ``keep`` is False (ranknum, hence the scale, is unchanged)."""
        keep = keep.to(self.lora_E[adapter_name].device).bool().view(-1)
        trainable = self.lora_A[adapter_name].requires_grad
        for attr, index in (("lora_A", (keep,)), ("lora_E", (keep,)), ("lora_B", (slice(None), keep))):
            container = getattr(self, attr)
            container[adapter_name] = nn.Parameter(container[adapter_name][index].clone(), requires_grad=trainable)
        self.r[adapter_name] = int(keep.sum())

    def _factor(self, adapter_name: str) -> float | torch.Tensor:
        return self.scaling[adapter_name] / (self.ranknum[adapter_name] + 1e-5)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        delta = (b @ (a * e)) * self._factor(adapter_name)
        if self.is_conv:
            return delta.reshape(self.get_base_layer().weight.shape)
        return delta.T if self.fan_in_fan_out else delta

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, e, b = self.lora_A[adapter_name], self.lora_E[adapter_name], self.lora_B[adapter_name]
        x = self.lora_dropout[adapter_name](x.to(a.dtype))
        if self.is_conv:
            base = self.get_base_layer()
            kernel = ((b @ (a * e)) * self._factor(adapter_name)).reshape(base.weight.shape)
            update = F.conv2d(x, kernel, stride=base.stride, padding=base.padding, dilation=base.dilation)
        else:
            update = (x @ (a * e).T @ b.T) * self._factor(adapter_name)
        return result + update.to(result.dtype)


def create_adalora_layer(target: nn.Module, adapter_name: str, config: AdaLoraConfig,
                         module_name: str) -> AdaLoraLayer | None:
    if not (is_linear_like(target) or isinstance(target, nn.Conv2d)):
        return None
    layer = AdaLoraLayer(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer
