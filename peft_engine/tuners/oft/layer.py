"""OFT layers: the input is rotated by a block-diagonal orthogonal matrix R before the base layer.

``y = W (R x) + b`` for Linear / Conv1D / bitsandbytes linears, the embedding vector rotated
for Embedding, and every (C x k x k) input patch rotated for Conv2d (a rotated kernel).
R is never built for the forward: x is cut into blocks and each block multiplied by its
(b x b) rotation, ``in * b`` multiply-adds per token instead of ``in²`` (the weight is not
touched either, so the base layer may be quantized). Merging folds R into the weight
(``W R^T``); unmerging multiplies by the inverse (the Neumann series is only nearly orthogonal).

Each block is the Cayley transform ``(I - Q)(I + Q)^-1`` of a skew-symmetric Q built from the
trained upper triangle, or its Neumann-series approximation ``I + 2Q + 2Q² + ... + Q^(n-1)``.
``coft`` keeps each Q within ``eps`` of zero; ``block_share`` uses one block for all.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...targets import Conv1D
from ..common import ComposedMethodLayer, in_out_features, is_linear_like
from .config import OFTConfig


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ block_diag(blocks)`` without the block-diagonal matrix; blocks is (n, b, b) or (1, b, b)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    count = x.shape[-1] // b
    grid = x.reshape(*x.shape[:-1], count, b)
    if n == 1 and count > 1:
        return (grid @ blocks[0]).reshape(x.shape)
    return torch.einsum("...rk,rkc->...rc", grid, blocks).reshape(x.shape)


def block_dropout(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout: ``int(p * n)`` random blocks become the identity."""
    n, b = blocks.shape[0], blocks.shape[-1]
    drop = int(p * n)
    if n == 1 or drop == 0:
        return blocks
    mask = torch.zeros(n, device=blocks.device, dtype=blocks.dtype)
    mask[torch.randperm(n, device=blocks.device)[:drop]] = 1
    eye = torch.eye(b, device=blocks.device, dtype=blocks.dtype)
    mask = mask.view(n, 1, 1)
    return (1 - mask) * blocks + mask * eye


class OFTRotation(nn.Module):
    """The trained upper triangles of the skew-symmetric generators (HF PEFT's ``oft_R`` module)."""

    def __init__(self, stored_blocks: int, block_size: int, config: OFTConfig) -> None:
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.zeros(stored_blocks, block_size * (block_size - 1) // 2))
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        q = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        q[:, self.rows, self.cols] = vec
        return q - q.transpose(-2, -1)

    @torch.no_grad()
    def project(self) -> None:
        """COFT: pull each generator back into the Frobenius ball of radius eps / sqrt(blocks)."""
        q = self.skew(self.weight)
        eps = self.eps / math.sqrt(q.shape[0])
        norm = torch.linalg.matrix_norm(q, keepdim=True)
        q = torch.where(norm <= eps, q, eps * q / norm)
        self.weight.copy_(q[:, self.rows, self.cols])

    def blocks(self) -> torch.Tensor:
        """The (stored_blocks, b, b) rotations."""
        if self.coft:
            self.project()
        q = self.skew(self.weight)
        if not self.neumann:
            eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
            return torch.linalg.solve(eye + q, eye - q, left=False)
        result = torch.eye(self.block_size, device=q.device, dtype=q.dtype).repeat(q.shape[0], 1, 1)
        if self.terms > 1:
            result = result + 2 * q
        if self.terms > 2:  # HF PEFT's exact series: 2 Q² ... 2 Q^(n-2), then Q^(n-1) (n >= 4)
            power = q @ q
            result = result + 2 * power
            for _ in range(3, self.terms - 1):
                power = power @ q
                result = result + 2 * power
            result = result + power @ q
        return result


class OFTLayer(ComposedMethodLayer):
    adapter_layer_names = ("oft_R", "oft_embedding_R")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.oft_R = nn.ModuleDict()
        self.oft_embedding_R = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.oft_block_size: dict[str, int] = {}
        self.module_dropout: dict[str, float] = {}
        base = self.get_base_layer()
        self.kind = "embedding" if isinstance(base, nn.Embedding) else "conv" if isinstance(base, nn.Conv2d) else "linear"
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if self.kind == "embedding":
            self.in_features, self.out_features = base.embedding_dim, base.num_embeddings
        else:
            self.in_features, self.out_features = in_out_features(base)
        if self.kind == "conv":
            if base.groups > 1:
                raise ValueError(f"OFT does not support Conv2d with groups={base.groups}; allowed: groups 1")
            self.rotated_width = self.in_features * base.kernel_size[0] * base.kernel_size[0]
        else:
            self.rotated_width = self.in_features

    def update_layer(self, adapter_name: str, config: OFTConfig, module_name: str) -> None:
        width = self.rotated_width
        r, block = config.r, config.oft_block_size
        if r == 0:
            if width % block or block > width:
                block, old = nearest_divisor(width, block), block
                warnings.warn(f"{module_name}: oft_block_size={old} does not divide {width}; using {block}", stacklevel=3)
            r = width // block
        else:
            if width % r or r > width:
                r, old = nearest_divisor(width, r), r
                warnings.warn(f"{module_name}: r={old} does not divide {width}; using {r}", stacklevel=3)
            block = width // r
        rotation = OFTRotation(1 if config.block_share else r, block, config)
        if not config.init_weights:
            nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
        device, dtype = self.base_device_dtype()
        rotation.to(device, dtype)
        container = self.oft_embedding_R if self.kind == "embedding" else self.oft_R
        container[adapter_name] = rotation
        self.r[adapter_name], self.oft_block_size[adapter_name] = r, block
        self.module_dropout[adapter_name] = config.module_dropout
        if not self.active_adapters:
            self.active_adapters = [adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        for table in (self.r, self.oft_block_size, self.module_dropout):
            table.pop(adapter_name, None)

    def rotation(self, adapter_name: str) -> OFTRotation:
        return (self.oft_embedding_R if self.kind == "embedding" else self.oft_R)[adapter_name]

    def blocks(self, adapter_name: str, *, train: bool = False) -> torch.Tensor:
        blocks = self.rotation(adapter_name).blocks()
        p = self.module_dropout[adapter_name]
        return block_dropout(blocks, p) if train and self.training and p > 0 else blocks

    def matrix(self, adapter_name: str) -> torch.Tensor:
        """The full block-diagonal rotation (for merging)."""
        blocks = self.blocks(adapter_name)
        if blocks.shape[0] == 1:
            blocks = blocks.expand(self.r[adapter_name], -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    # ---- forward ----------------------------------------------------------------------------
    def _apply(self, names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        present = [n for n in names if n in self.r]
        if not present:
            return self.base_layer(x, *args, **kwargs)
        if self.kind == "embedding":
            result = self.base_layer(x, *args, **kwargs)
            dtype = result.dtype
            for name in present:
                blocks = self.blocks(name, train=True)
                result = rotate_blocks(result.to(blocks.dtype), blocks)
            return result.to(dtype)
        if self.kind == "conv":
            return self._conv(present, x)
        dtype = x.dtype
        for name in present:
            blocks = self.blocks(name, train=True)
            x = rotate_blocks(x.to(blocks.dtype), blocks)
        return self.base_layer(x.to(dtype), *args, **kwargs)

    def _conv(self, names: Sequence[str], x: torch.Tensor) -> torch.Tensor:
        """Rotating every input patch by R equals convolving with ``W R^T``: the kernel is tiny, rotate it.

        (HF PEFT instead rotates stride-1 patches and folds them back, which sums overlapping
        patches: for kernels larger than 1x1 its output differs from its own merged weight and
        from the base model even at the identity initialisation. This follows the merged form.)
        """
        base = self.get_base_layer()
        if base is not self.base_layer:
            raise NotImplementedError("OFT on a Conv2d cannot wrap another method's adapter layer (mixed models)")
        weight = base.weight
        dense = weight.reshape(weight.shape[0], -1)
        for name in reversed(names):  # x -> x R1 -> x R1 R2: the kernel is W R2^T R1^T
            blocks = self.blocks(name, train=True)
            dense = self._dense_rotate(dense.to(blocks.dtype), blocks)
        return base._conv_forward(x.to(dense.dtype), dense.reshape(weight.shape).to(weight.dtype), base.bias)

    @staticmethod
    def _dense_rotate(dense: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``dense @ block_diag(blocks)^T``: every row rotated block by block."""
        return rotate_blocks(dense, blocks.transpose(-2, -1))

    # ---- merging ----------------------------------------------------------------------------
    def _dense(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as (out, rotated inputs): Conv1D transposed, conv kernels flattened."""
        if self.kind == "conv":
            return weight.reshape(weight.shape[0], -1)
        return weight.T if self.fan_in_fan_out else weight

    def _stored(self, dense: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return dense.reshape(like.shape)
        return dense.T if self.fan_in_fan_out else dense

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        rot = self.matrix(adapter_name).detach()
        if self.kind == "embedding":
            return (weight.to(rot.dtype) @ rot).to(weight.dtype)
        dense = self._dense(weight).to(rot.dtype)
        return self._stored(dense @ rot.T, weight).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        rot = self.matrix(adapter_name).detach()
        inverse = torch.linalg.inv(rot.float()).to(rot.dtype)
        if self.kind == "embedding":
            return (weight.to(rot.dtype) @ inverse).to(weight.dtype)
        dense = self._dense(weight).to(rot.dtype)
        return self._stored(dense @ inverse.T, weight).to(weight.dtype)


def nearest_divisor(width: int, value: int) -> int:
    """HF PEFT's adjustment: the divisor of ``width`` closest to ``value`` (ties go down)."""
    if value >= width:
        return width
    higher = value
    while higher <= width and width % higher:
        higher += 1
    lower = value
    while lower > 1 and width % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def create_oft_layer(target: nn.Module, adapter_name: str, config: OFTConfig, module_name: str) -> OFTLayer | None:
    if not (is_linear_like(target) or isinstance(target, (nn.Conv2d, nn.Embedding))):
        return None
    layer = OFTLayer(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer
