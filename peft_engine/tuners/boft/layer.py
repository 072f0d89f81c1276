"""BOFT layers: ``y = s ⊙ (W (M x)) + b`` with M a product of butterfly-permuted block rotations.

``M = B_{m-1} ... B_0`` with ``B_i = P_i diag(R_i1, ..., R_iD) P_i^T``: P_i is the i-th butterfly
permutation and the R are exact Cayley transforms ``(I - S)(I + S)^-1`` of ``S = (R - R^T) / 2``.
``s`` (``boft_s``) rescales each output. Linear layers apply M to the input as permutations
and small block products (``m * in * b`` multiply-adds per token, no in x in matrix); Conv2d
rotates the (small) flattened kernel instead, ``W M^T``, which is the same map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...targets import Conv1D
from ..common import ComposedMethodLayer, in_out_features, is_linear_like
from ..oft.layer import rotate_blocks
from .config import BOFTConfig


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> torch.Tensor:
    """HF PEFT's block butterfly permutation of ``range(n)`` (identity when ``factors == 0``)."""
    if factors == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError(f"invalid butterfly: {blocks} blocks of half-size {half} do not fit width {n}")
    size = n // blocks
    step = size // half
    positions = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.cat([torch.arange(int(p) * half, int(p) * half + half) for p in positions])
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start:start + size] = indices[start:start + size][order]
    return indices


def cayley(raw: torch.Tensor) -> torch.Tensor:
    """Exact Cayley transform of the skew part of each (b x b) matrix in ``raw`` (..., b, b)."""
    skew = 0.5 * (raw - raw.transpose(-2, -1))
    eye = torch.eye(raw.shape[-1], device=raw.device, dtype=raw.dtype).expand_as(skew)
    return torch.linalg.solve(eye + skew, eye - skew, left=False)


class BOFTLayer(ComposedMethodLayer):
    adapter_layer_names = ("boft_R", "boft_s")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.boft_R = nn.ParameterDict()
        self.boft_s = nn.ParameterDict()
        self.boft_block_size: dict[str, int] = {}
        self.boft_block_num: dict[str, int] = {}
        self.boft_dropout: dict[str, float] = {}
        self.perms: dict[str, list[torch.Tensor]] = {}
        base = self.get_base_layer()
        self.is_conv = isinstance(base, nn.Conv2d)
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = in_out_features(base)
        if self.is_conv:
            if base.groups > 1:
                raise ValueError(f"BOFT does not support Conv2d with groups={base.groups}; allowed: groups 1")
            self.width = self.in_features * base.kernel_size[0] * base.kernel_size[0]
        else:
            self.width = self.in_features

    def update_layer(self, adapter_name: str, config: BOFTConfig, module_name: str) -> None:
        width, extra = self.width, config.boft_n_butterfly_factor - 1
        size, num = config.boft_block_size, config.boft_block_num
        where = f"{module_name} (width {width})"
        if size == 0:
            if width % num:
                raise ValueError(f"{where}: boft_block_num={num} must divide the width")
            if extra and (extra > int(math.log2(num)) or num % (2**extra)):
                raise ValueError(f"{where}: boft_block_num={num} does not allow boft_n_butterfly_factor={extra + 1}")
            size = width // num
        else:
            if width % size:
                raise ValueError(f"{where}: boft_block_size={size} must divide the width")
            if extra and width % (size * 2**extra):
                raise ValueError(f"{where}: boft_block_size={size} does not allow boft_n_butterfly_factor={extra + 1}")
            num = width // size
        if extra and (num % 2 or size % 2):
            raise ValueError(f"{where}: butterfly factors need an even block size and count (got {size} x {num})")
        self.perms[adapter_name] = [butterfly_perm(width, num // 2**i, size // 2, extra) for i in range(extra + 1)]
        device, dtype = self.base_device_dtype()
        rotations = torch.zeros(extra + 1, num, size, size)
        scale = torch.ones((1, self.out_features) if self.is_conv else (self.out_features, 1))
        if not config.init_weights:
            nn.init.normal_(rotations, mean=0.0, std=0.1)
            nn.init.normal_(scale, mean=1.0, std=0.1)
        self.boft_R[adapter_name] = nn.Parameter(rotations.to(device, dtype))
        self.boft_s[adapter_name] = nn.Parameter(scale.to(device, dtype))
        self.boft_block_size[adapter_name], self.boft_block_num[adapter_name] = size, num
        self.boft_dropout[adapter_name] = config.boft_dropout
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        for table in (self.boft_block_size, self.boft_block_num, self.boft_dropout, self.perms):
            table.pop(adapter_name, None)

    # ---- the rotation -----------------------------------------------------------------------
    def blocks(self, adapter_name: str) -> torch.Tensor:
        """(factors, blocks, b, b) rotations, with block dropout in training."""
        blocks = cayley(self.boft_R[adapter_name])
        p = self.boft_dropout[adapter_name]
        if self.training and p > 0:
            factors, count = blocks.shape[:2]
            mask = torch.zeros(factors, count, 1, 1, device=blocks.device, dtype=blocks.dtype)
            chosen = torch.randperm(count, device=blocks.device)[: int(p * count)]
            mask[torch.randint(0, factors, (1,)).item(), chosen] = 1
            blocks = (1 - mask) * blocks + mask * torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
        return blocks

    def rotate(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ M`` applied as ``x @ B_{m-1} @ ... @ B_0``, each ``B_i`` as permute / rotate / permute back."""
        blocks = self.blocks(adapter_name)
        x = x.to(blocks.dtype)
        for i in reversed(range(blocks.shape[0])):
            perm = self.perms[adapter_name][i].to(x.device)
            x = rotate_blocks(x[..., torch.argsort(perm)], blocks[i])[..., perm]
        return x

    def matrix(self, adapter_name: str) -> torch.Tensor:
        """M itself, (width x width), for merging and convolutions."""
        weight = self.boft_R[adapter_name]
        return self.rotate(adapter_name, torch.eye(self.width, device=weight.device, dtype=weight.dtype))

    # ---- forward ----------------------------------------------------------------------------
    def _apply(self, names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        present = [n for n in names if n in self.boft_R]
        if not present:
            return self.base_layer(x, *args, **kwargs)
        scale = None
        for name in present:
            s = self.boft_s[name].reshape(-1)
            scale = s if scale is None else scale * s
        base = self.get_base_layer()
        if self.is_conv:
            weight = base.weight
            dense = weight.reshape(weight.shape[0], -1).to(scale.dtype)
            for name in present:  # x @ M_k ... M_1 on patches == kernel W M_1^T ... M_k^T
                dense = dense @ self.matrix(name).T
            kernel = (dense * scale[:, None]).reshape(weight.shape)
            return base._conv_forward(x.to(kernel.dtype), kernel, base.bias).to(x.dtype)
        dtype = x.dtype
        for name in reversed(present):  # HF PEFT: the rotation is M_k ... M_1, so the last adapter acts first
            x = self.rotate(name, x)
        result = self.base_layer(x.to(dtype), *args, **kwargs)
        bias = getattr(base, "bias", None)
        if bias is None:
            return (result * scale).to(result.dtype)
        return ((result - bias) * scale + bias).to(result.dtype)

    # ---- merging: W -> s ⊙ (W M^T), back: (W / s) M ----------------------------------------------
    def _dense(self, weight: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.fan_in_fan_out else weight

    def _stored(self, dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.is_conv:
            return dense.reshape(like.shape)
        return dense.T if self.fan_in_fan_out else dense

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        rot = self.matrix(adapter_name).detach()
        scale = self.boft_s[adapter_name].detach().reshape(-1, 1)
        dense = self._dense(weight).to(rot.dtype)
        return self._stored((dense @ rot.T) * scale, weight).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        rot = self.matrix(adapter_name).detach()
        scale = self.boft_s[adapter_name].detach().reshape(-1, 1)
        dense = self._dense(weight).to(rot.dtype)
        return self._stored((dense @ rot) / scale, weight).to(weight.dtype)


def create_boft_layer(target: nn.Module, adapter_name: str, config: BOFTConfig, module_name: str) -> BOFTLayer | None:
    if not (is_linear_like(target) or isinstance(target, nn.Conv2d)):
        return None
    layer = BOFTLayer(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer
