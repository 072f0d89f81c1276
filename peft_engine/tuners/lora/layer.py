"""LoRA layers: ``y = base(x) + s * B(A(dropout(x)))`` with ``s = alpha / r`` (or ``alpha / sqrt(r)``).

One class per base-layer kind: :class:`Linear` (nn.Linear and transformers' Conv1D, whose
weight is stored transposed), :class:`Embedding` and :class:`Conv` (Conv1d / Conv2d). Tensor
attribute names follow HF PEFT (``lora_A``, ``lora_B``, ``lora_embedding_A``,
``lora_embedding_B``, ``lora_magnitude_vector``) so saved files line up key for key. DoRA's
math lives in :mod:`.dora`, the non-default initialisations in :mod:`.init`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...targets import linear_types
from ..base import AdapterLayer
from ..common import has_hooks
from . import dora, fused
from .config import LoraConfig
from .init import initialise
from .shared_input import FusedOperands, SharedInputGroup


class LoraLayer(AdapterLayer):
    adapter_layer_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # adapter -> DoraMagnitude
        self.lora_dropout = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.use_dora: dict[str, bool] = {}
        # Weight norms at merge time: DoRA's unmerge must divide by the very norm it multiplied by.
        self._merge_norms: dict[str, torch.Tensor] = {}

    # ---- per-kind parts -------------------------------------------------------------------
    def create_factors(self, adapter_name: str, r: int) -> None:
        raise NotImplementedError

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) as 2-D matrices of shapes (r, fan_in) and (fan_out, r)."""
        raise NotImplementedError

    # ---- shared LoRA behaviour -------------------------------------------------------------
    def update_layer(self, adapter_name: str, config: LoraConfig, module_name: str) -> None:
        r, alpha = config.rank_and_alpha(module_name)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.create_factors(adapter_name, r)
        initialise(self, adapter_name, config)
        self._match_device(adapter_name)
        self.use_dora[adapter_name] = config.use_dora
        if config.use_dora:
            norm = dora.weight_norm(self, self.dense_base_weight(), self.dense_delta(adapter_name))
            self.lora_magnitude_vector[adapter_name] = dora.DoraMagnitude(norm.detach().clone())
        if adapter_name not in self.active_adapters and not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        for table in (self.r, self.lora_alpha, self.scaling, self.use_dora, self._merge_norms):
            table.pop(adapter_name, None)
        if adapter_name in self.lora_dropout:
            del self.lora_dropout[adapter_name]

    def _match_device(self, adapter_name: str) -> None:
        weight = self.get_base_weight()
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(self, attr)
            if adapter_name in container:
                entry = container[adapter_name]
                if isinstance(entry, nn.Parameter):
                    container[adapter_name] = nn.Parameter(entry.data.to(weight.device, dtype))
                else:
                    entry.to(weight.device, dtype)

    # Merging works in the "dense" layout (fan_out, fan_in, ...), where DoRA's norms are row norms.
    def to_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def from_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def dense_base_weight(self) -> torch.Tensor:
        return self.to_dense(self.get_base_weight())

    def dense_delta(self, adapter_name: str) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        return ((b @ a) * self.scaling[adapter_name]).reshape(self.dense_base_weight().shape)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.from_dense(self.dense_delta(adapter_name))

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        dense = self.to_dense(weight)
        delta = self.dense_delta(adapter_name).to(dense.dtype)
        if not self.use_dora.get(adapter_name):
            return self.from_dense(dense + delta)
        # The norm is that of the unmerged base plus this delta, as the forward computes it (and HF
        # PEFT merges it): adapters merged before this one are taken out of the weight for the norm.
        base = dense
        for name in reversed(self.merged_adapters):
            base = self._remove_merged(name, base, self._merge_norms.get(name))
        norm = dora.weight_norm(self, base, delta).detach()
        self._merge_norms[adapter_name] = norm
        return self.from_dense(dora.row_scale(self, adapter_name, norm, dense) * (dense + delta))

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        norm = self._merge_norms.pop(adapter_name, None)
        return self.from_dense(self._remove_merged(adapter_name, self.to_dense(weight), norm))

    def _remove_merged(self, adapter_name: str, dense: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """Inverse of merging one adapter, in the dense layout (DoRA: with the norm used to merge it)."""
        delta = self.dense_delta(adapter_name).to(dense.dtype)
        if not self.use_dora.get(adapter_name):
            return dense - delta
        return dense / dora.row_scale(self, adapter_name, norm, dense) - delta


class Linear(LoraLayer):
    """LoRA for nn.Linear and transformers' Conv1D (``fan_in_fan_out``: weight is (in, out))."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        if self.fan_in_fan_out:
            self.in_features, self.out_features = weight.shape
        else:
            self.in_features = getattr(base_layer, "in_features", weight.shape[1])
            self.out_features = getattr(base_layer, "out_features", weight.shape[0])
        # Set by ``shared_input.link_shared_inputs`` for siblings called on the same input (q/k/v).
        self._shared_input: SharedInputGroup | None = None

    def create_factors(self, adapter_name: str, r: int) -> None:
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=False)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def to_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    from_dense = to_dense

    def _active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            out = self._fused_forward(x)
            if out is not None:
                return out
        return super()._active_forward(x, *args, **kwargs)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Base and adapter as one autograd node (see :mod:`.fused`), with the siblings that read the
        same input where there are any (see :mod:`.shared_input`), or None to take the general path."""
        group = self._shared_input
        if group is not None:
            out = group.output(self, x)
            if out is not None:
                return out
        ops = self.fused_operands(x)
        if ops is None:
            return None
        if ops.magnitude is None:
            return fused.lora_linear(x, ops.weight, ops.bias, ops.a, ops.b, ops.scaling, self.fan_in_fan_out)
        return fused.dora_linear(x, ops.weight, ops.bias, ops.a, ops.b, ops.magnitude, ops.scaling, self.fan_in_fan_out)

    def fused_operands(self, x: torch.Tensor) -> FusedOperands | None:
        """The tensors of the fused forward on ``x``, or None where it does not apply.

        Fused only in the plain case: one active, unmerged adapter on a bare nn.Linear / Conv1D (not
        quantized, not another adapter layer, no module hooks on it or on every module), no dropout
        at work, one dtype and device throughout, no autocast. This runs for every layer of every
        step, between GEMMs that have pushed the interpreter's objects out of cache: measured in a
        SmolLM2 block each check costs 2-8 us there, against 0.1-0.5 us in a loop on its own. Hence the plain dict reads (not
        ``nn.Module.__getattr__``), and no ``torch.device`` objects on CPU: ``x.device.type`` and the
        string parse behind ``torch.is_autocast_enabled(str)`` cost ~3 us a layer in a model.
        """
        if self.disable_adapters or self.merged_adapters or self.batch_adapter_names is not None:
            return None
        modules = self._modules
        lora_a = modules["lora_A"]._modules
        active = self.active_adapters
        names = active if len(active) == 1 else [n for n in active if n in lora_a]
        if len(names) != 1 or names[0] not in lora_a:
            return None
        name = names[0]
        base = modules["base_layer"]
        if type(base) not in _LINEAR_TYPES or has_hooks(base):
            return None
        dropout = modules["lora_dropout"]._modules[name]
        if dropout.training and dropout.__dict__.get("p", 0.0) > 0:  # nn.Identity has no ``p``
            return None
        weight, bias = base._parameters["weight"], base._parameters.get("bias")
        a = lora_a[name]._parameters["weight"]
        b = modules["lora_B"]._modules[name]._parameters["weight"]
        dtype = x.dtype
        if not (dtype == weight.dtype == a.dtype == b.dtype and x.is_floating_point()):
            return None
        if x.is_cpu:  # the common CPU case without torch.device objects
            if not weight.is_cpu or torch.is_autocast_enabled("cpu"):
                return None
        elif weight.device != x.device or torch.is_autocast_enabled(x.device.type):
            return None
        if bias is not None and (bias.dtype != dtype or bias.device != weight.device):
            return None
        if not self.use_dora[name]:
            return FusedOperands(weight, bias, a, b, self.scaling[name], None)
        magnitude = modules["lora_magnitude_vector"]._modules[name]._parameters["weight"]
        if weight.requires_grad or magnitude.dtype != dtype or magnitude.shape != (self.out_features,):
            return None
        return FusedOperands(weight, bias, a, b, self.scaling[name], magnitude)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        scaling = self.scaling[adapter_name]
        dropout = self.lora_dropout[adapter_name]
        x = x.to(a.dtype)
        if self.use_dora[adapter_name]:
            return dora.linear_output(self, adapter_name, x, result)
        hidden = F.linear(dropout(x), a)
        # One fused multiply-add over the output instead of matmul, scale and add.
        flat = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), b.T,
                           alpha=scaling)
        return flat.view(result.shape)


_LINEAR_TYPES = linear_types()


class Embedding(LoraLayer):
    """LoRA for nn.Embedding: ``A`` is (r, num_embeddings), ``B`` is (embedding_dim, r)."""

    def create_factors(self, adapter_name: str, r: int) -> None:
        num, dim = self.base_layer.weight.shape
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.zeros(r, num))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.zeros(dim, r))

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def to_dense(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T  # (embedding_dim, num_embeddings): DoRA's norms run over the vocabulary

    from_dense = to_dense

    def embed(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(x, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        a, b = self.factors(adapter_name)
        update = (self.embed(x, a.T) @ b.T) * self.scaling[adapter_name]
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:
            update = update * embed_scale.to(update.dtype)
        if self.use_dora[adapter_name]:
            return dora.embedding_output(self, adapter_name, result, update)
        return result + update.to(result.dtype)


class Conv(LoraLayer):
    """LoRA for nn.Conv1d / nn.Conv2d: ``A`` is a conv with the base's kernel, ``B`` a 1x1 conv."""

    def create_factors(self, adapter_name: str, r: int) -> None:
        base = self.base_layer
        conv = type(base)
        ones = (1,) * (base.weight.dim() - 2)
        self.lora_A[adapter_name] = conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[adapter_name] = conv(r, base.out_channels, ones, ones, bias=False)

    def factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        return a.flatten(1), b.flatten(1)

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A[adapter_name].weight.dtype)
        if self.use_dora[adapter_name]:
            return dora.conv_output(self, adapter_name, x, result)
        dropped = self.lora_dropout[adapter_name](x)
        update = self.lora_B[adapter_name](self.lora_A[adapter_name](dropped))
        return result + update * self.scaling[adapter_name]


def create_lora_layer(target: nn.Module, adapter_name: str, config: LoraConfig, module_name: str) -> LoraLayer | None:
    """The unquantized layer kinds; quantized kinds register their own factory."""
    if isinstance(target, linear_types()):
        layer: LoraLayer = Linear(target)
    elif isinstance(target, nn.Embedding):
        layer = Embedding(target)
    elif isinstance(target, (nn.Conv1d, nn.Conv2d)):
        layer = Conv(target)
    else:
        return None
    layer.update_layer(adapter_name, config, module_name)
    return layer
