"""What LoHa and LoKr (the LyCORIS family) layers share: dropouts, conv plumbing (config: :mod:`.lycoris_config`).

Both add ``scaling * delta(x)`` to the base output, with ``scaling = alpha / r``. Two
training-time dropouts follow HF PEFT: ``module_dropout`` skips the whole adapter for a
step with that probability, ``rank_dropout`` zeroes random output rows of the update.
On Linear layers, training runs one GEMM with ``W + delta`` (see ``_merged_forward``) and
inference computes the update from the factors without building the (out x in) delta; on
convolutions the (small) dense kernel delta is built and convolved.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import MethodLayer, has_hooks, in_out_features, is_quantized
from .common import is_linear_like as _is_linear_like

_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d}


class LycorisLayer(MethodLayer):
    """Bookkeeping and forward plumbing; subclasses make the factors and the two delta forms."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        base = self.get_base_layer()
        self.conv_fn = next((fn for kind, fn in _CONV.items() if isinstance(base, kind)), None)
        self.fan_in_fan_out = not isinstance(base, nn.Linear) and self.conv_fn is None  # transformers Conv1D
        self.in_features, self.out_features = in_out_features(base)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}

    def set_hyperparameters(self, adapter_name: str, config: Any, module_name: str, *, scale_drop: bool) -> int:
        r, alpha = config.rank_and_alpha(module_name)
        self.r[adapter_name], self.alpha[adapter_name] = r, alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.rank_dropout_scale[adapter_name] = scale_drop
        self.module_dropout[adapter_name] = config.module_dropout
        return r

    def finish_update(self, adapter_name: str) -> None:
        device, dtype = self.base_device_dtype()
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                container[adapter_name] = nn.Parameter(container[adapter_name].data.to(device, dtype))
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        for table in (self.r, self.alpha, self.scaling, self.rank_dropout, self.rank_dropout_scale, self.module_dropout):
            table.pop(adapter_name, None)

    def conv_dims(self) -> tuple[int, int, tuple[int, ...]]:
        """(out_channels, in_channels per group, kernel size) of a conv base."""
        base = self.get_base_layer()
        return base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size)

    # ---- subclass parts ---------------------------------------------------------------------
    def dense_delta(self, adapter_name: str) -> torch.Tensor:
        """``scaling * delta`` as (out, in) for linears, or the conv kernel's shape."""
        raise NotImplementedError

    def linear_delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling * delta @ x`` for linear layers, from the factors."""
        raise NotImplementedError

    # ---- shared -----------------------------------------------------------------------------
    def row_drop(self, adapter_name: str, rows: int, like: torch.Tensor) -> torch.Tensor | None:
        """Rank dropout: a 0/1 vector over output rows (rescaled to mean 1 if asked), in training only."""
        p = self.rank_dropout[adapter_name]
        if not (self.training and p):
            return None
        drop = (torch.rand(rows) > p).to(like.dtype)
        if self.rank_dropout_scale[adapter_name]:
            drop = drop / drop.mean()
        return drop.to(like.device)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        delta = self.dense_delta(adapter_name)
        return delta.T if self.fan_in_fan_out else delta

    def _active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._trains_merged():
            return self._merged_forward(x)
        return super()._active_forward(x, *args, **kwargs)

    def _trains_merged(self) -> bool:
        """Training on a plain (unquantized, unstacked) linear base."""
        base = self.base_layer
        return (self.training and torch.is_grad_enabled() and self.conv_fn is None
                and base is self.get_base_layer() and base.weight.is_floating_point() and not is_quantized(base)
                and not has_hooks(base))

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x (W + sum of deltas)^T + bias``: one GEMM with the summed weight.

        Why: ``base(x) + x delta^T`` costs three full (tokens x in x out) GEMMs more than the
        frozen base in a training step (the update forward, its input gradient, the delta's
        gradient); through the summed weight only the delta's gradient remains, and building
        the delta from its factors is cheap next to it. Dropouts act as in the factored form:
        module dropout skips an adapter, rank dropout zeroes rows of its delta.
        """
        base = self.base_layer
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        for name in self.active_adapters:
            if name not in self.adapter_names:
                continue
            p = self.module_dropout[name]
            if p and torch.rand(1) <= p:
                continue
            weight = self.add_delta(name, weight)
        return F.linear(x.to(weight.dtype), weight, base.bias)

    def add_delta(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight + delta`` for training through the summed weight, rank dropout applied."""
        delta = self.dense_delta(adapter_name)
        drop = self.row_drop(adapter_name, delta.shape[0], delta)
        if drop is not None:
            delta = delta * drop[:, None]
        return weight + delta.to(weight.dtype)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        p = self.module_dropout[adapter_name]
        if self.training and p and torch.rand(1) <= p:
            return result  # the whole adapter is dropped for this step
        if self.conv_fn is None:
            update = self.linear_delta_output(adapter_name, x)
        else:
            base = self.get_base_layer()
            weight = self.dense_delta(adapter_name)
            drop = self.row_drop(adapter_name, weight.shape[0], weight)
            if drop is not None:
                weight = weight * drop.view(-1, *([1] * (weight.dim() - 1)))
            update = self.conv_fn(x.to(weight.dtype), weight, stride=base.stride, padding=base.padding,
                                  dilation=base.dilation, groups=base.groups)
        return result + update.to(result.dtype)


def lycoris_target(target: nn.Module) -> bool:
    """Layer kinds LoHa and LoKr wrap: Linear, transformers Conv1D, Conv1d, Conv2d."""
    return _is_linear_like(target) or isinstance(target, tuple(_CONV))
