"""OFT layers: the input is rotated by a block-diagonal orthogonal matrix R before the base layer.

``y = W (R x) + b`` for Linear / Conv1D / bitsandbytes linears, the embedding vector rotated
for Embedding, and every (C x k x k) input patch rotated for Conv2d (a rotated kernel).
R is never built for the forward: x is cut into blocks and each block multiplied by its
(b x b) rotation, ``in * b`` multiply-adds per token instead of ``in²`` (the weight is not
touched either, so the base layer may be quantized). Merging folds R into the weight
(``W R^T``); unmerging multiplies by the inverse (the Neumann series is only nearly orthogonal).
A training forward with more tokens than output features (a plain linear base) rotates the
weight's column blocks instead, ``W R^T`` being the cheaper product there (:class:`_RotatedLinear`).
The rotation and the Neumann series have hand-written backwards (batched GEMMs on strided views,
the polynomial's derivative in Horner form) in place of autograd's many small kernels.

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
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ...targets import Conv1D
from ..common import ComposedMethodLayer, has_hooks, in_out_features, is_linear_like, is_quantized
from .config import OFTConfig


def rotate_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ block_diag(blocks)`` without the block-diagonal matrix; blocks is (n, b, b) or (1, b, b)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    count = x.shape[-1] // b
    if n == 1 and count > 1:
        return (x.reshape(*x.shape[:-1], count, b) @ blocks[0]).reshape(x.shape)
    return _BlockRotation.apply(x, blocks)


class _BlockRotation(torch.autograd.Function):
    """``x @ block_diag(blocks)`` as one batched GEMM per pass, with the block index as the batch.

    x is read as (tokens, n, b) and handed to ``bmm`` as the strided view (n, tokens, b): no
    copy going in, one going out. The backward is the two batched GEMMs the gradients need
    (``g blocks^T`` for x, ``x^T g`` per block for the blocks) on the same views; einsum's
    autograd instead copies inputs and gradients into block-major layouts on each pass.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, blocks)
        return _rotate(x, blocks)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x, blocks = ctx.saved_tensors
        # Under autocast the forward may have run in lower precision; the backward runs in the inputs'.
        grad = grad.to(blocks.dtype)
        grad_x = grad_blocks = None
        if ctx.needs_input_grad[0]:
            grad_x = _rotate(grad, blocks.transpose(-2, -1)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_blocks = _block_outer(x.to(blocks.dtype), grad, blocks.shape[0], blocks.shape[-1])
        return grad_x, grad_blocks


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


class _RotatedLinear(torch.autograd.Function):
    """``F.linear(x @ block_diag(blocks), W, bias)`` computed as ``F.linear(x, W block_diag(blocks)^T, bias)``.

    For a training step with more tokens than output features (k/v projections: 512 tokens,
    192 outputs) rotating the weight's column blocks costs ``out * in * b`` multiply-adds
    against ``tokens * in * b`` for the input, and copies an (out x in) matrix instead of a
    (tokens x in) one. The backward is the input route's (the gradient of the rotated input,
    ``g W``, is needed for the blocks anyway): ``g W`` then two batched GEMMs, no
    (out x in) weight gradient.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, blocks: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, blocks, weight)
        return F.linear(x, _rotate(weight, blocks.transpose(-2, -1)), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, blocks, weight = ctx.saved_tensors
        grad = grad.to(weight.dtype)
        grad_rotated = grad @ weight  # the gradient of x @ block_diag(blocks)
        grad_x = grad_blocks = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _rotate(grad_rotated, blocks.transpose(-2, -1)).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_blocks = _block_outer(x.to(blocks.dtype), grad_rotated.to(blocks.dtype), blocks.shape[0],
                                       blocks.shape[-1])
        if ctx.needs_input_grad[2]:  # a trainable base weight (not the usual case)
            flat = grad.reshape(-1, grad.shape[-1])
            grad_weight = flat.T @ _rotate(x, blocks).reshape(-1, x.shape[-1]).to(weight.dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_blocks, grad_weight, grad_bias


def _rotate(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ block_diag(blocks)`` outside autograd's view: one batched GEMM (or one GEMM for a shared block)."""
    n, b = blocks.shape[0], blocks.shape[-1]
    if n == 1:
        return (x.reshape(-1, b) @ blocks[0]).reshape(x.shape)
    return torch.bmm(x.reshape(-1, n, b).transpose(0, 1), blocks).transpose(0, 1).reshape(x.shape)


def _block_outer(x: torch.Tensor, grad: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """The blocks' gradient of ``x @ block_diag(blocks)`` given the output's: ``x_i^T g_i`` per block (summed if shared)."""
    if n == 1:
        return (x.reshape(-1, b).T @ grad.reshape(-1, b)).unsqueeze(0)
    return torch.bmm(x.reshape(-1, n, b).permute(1, 2, 0), grad.reshape(-1, n, b).transpose(0, 1))


def neumann_coefficients(terms: int) -> list[float]:
    """Coefficients of HF PEFT's truncated Cayley series ``sum c_k Q^k`` for ``terms`` terms.

    1: I; 2: I + 2Q; n >= 3: I + 2Q + ... + 2Q^(m-1) + Q^m with m = max(n - 1, 3) (HF PEFT's loop
    adds 2Q² and a final Q³ already for n = 3, exactly as for n = 4).
    """
    if terms <= 2:
        return [1.0, 2.0][:max(terms, 1)]
    top = max(terms - 1, 3)
    return [1.0] + [2.0] * (top - 1) + [1.0]


class _CayleyNeumann(torch.autograd.Function):
    """The (n, b, b) blocks ``sum c_k Q^k`` from the trained upper triangles, with a hand-written backward.

    The forward is HF PEFT's series (same operations in the same order, so the same values).
    Autograd through it runs ~25 small kernels per backward (the matmul chain, the scalings, the
    eye/add bookkeeping, a scatter for the skew matrix); this backward is the derivative of the
    polynomial in Horner form, ``dQ = sum_j A^j G N_j`` with ``A = Q^T`` and
    ``N_j = sum_(k>j) c_k A^(k-1-j)``, i.e. two batched GEMMs per power, on the powers the
    forward already made, then ``dvec = dQ[upper] - dQ[lower]``.
    """

    @staticmethod
    def forward(ctx: Any, vec: torch.Tensor, index: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor,
                block_size: int, terms: int) -> torch.Tensor:
        q = skew_from_upper(vec, index, block_size)
        result = torch.add(torch.eye(block_size, device=q.device, dtype=q.dtype), q, alpha=2.0)  # I + 2Q
        powers = [q]
        if terms > 2:  # HF PEFT's exact series: 2 Q² ... 2 Q^(n-2), then Q^(n-1) (n >= 4)
            power = torch.bmm(q, q)
            result.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                powers.append(power)
                power = torch.bmm(power, q)
                result.add_(power, alpha=2.0)
            powers.append(power)
            result.add_(torch.bmm(power, q))
        ctx.save_for_backward(upper, lower, *powers)
        ctx.coefficients = neumann_coefficients(terms)
        return result

    @staticmethod
    @once_differentiable  # the saved powers carry no graph: refuse double backward rather than get it wrong
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        upper, lower, *powers = ctx.saved_tensors
        c = ctx.coefficients
        m = len(c) - 1  # the highest power; powers holds Q^1 .. Q^(m-1)
        powers = [p.to(grad.dtype) for p in powers]  # autocast may have made them in lower precision
        a = powers[0].transpose(1, 2)
        acc = grad * c[m] if c[m] != 1 else grad
        for j in range(m - 2, -1, -1):  # acc = G N_j + A acc, with G N_j = c_(j+1) G + G (sum_i c_(j+1+i) Q^i)^T
            k = m - 1 - j
            tail = powers[k - 1] if c[j + 1 + k] == 1 else powers[k - 1] * c[j + 1 + k]
            for i in range(1, k):
                tail = tail.add(powers[i - 1], alpha=c[j + 1 + i])
            acc = torch.baddbmm(torch.baddbmm(grad, grad, tail.transpose(1, 2), beta=c[j + 1]), a, acc)
        flat = acc.reshape(acc.shape[0], -1)
        return flat.index_select(1, upper) - flat.index_select(1, lower), None, None, None, None, None


def skew_from_upper(vec: torch.Tensor, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """The skew-symmetric (n, b, b) matrices with upper triangles ``vec``: one gather from [vec, -vec, 0]."""
    table = torch.cat([vec, -vec, vec.new_zeros(vec.shape[0], 1)], dim=1)
    return table.index_select(1, index).view(vec.shape[0], block_size, block_size)


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
        # Flat (b*b) positions of the upper and lower triangles, and for each of the b*b entries
        # its place in [vec, -vec, 0] (the zero for the diagonal).
        upper, lower = rows * block_size + cols, cols * block_size + rows
        count = rows.numel()
        index = torch.full((block_size * block_size,), 2 * count, dtype=torch.long)
        index[upper] = torch.arange(count)
        index[lower] = torch.arange(count) + count
        self.register_buffer("upper", upper, persistent=False)
        self.register_buffer("lower", lower, persistent=False)
        self.register_buffer("skew_index", index, persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        return skew_from_upper(vec, self.skew_index, self.block_size)

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
        if self.neumann and self.terms > 1:
            return _CayleyNeumann.apply(self.weight, self.skew_index, self.upper, self.lower, self.block_size,
                                        self.terms)
        eye = torch.eye(self.block_size, device=self.weight.device, dtype=self.weight.dtype)
        if self.neumann:  # a single term: the identity
            return eye.repeat(self.weight.shape[0], 1, 1)
        q = self.skew(self.weight)
        eye = eye.expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)


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
        if len(present) == 1 and not args and not kwargs and self._rotates_weight(present[0], x):
            blocks = self.blocks(present[0], train=True)
            base = self.base_layer
            weight = base.weight.T if self.fan_in_fan_out else base.weight
            return _RotatedLinear.apply(x, blocks, weight, base.bias)
        for name in present:
            blocks = self.blocks(name, train=True)
            x = rotate_blocks(x.to(blocks.dtype), blocks)
        return self.base_layer(x.to(dtype), *args, **kwargs)

    def _rotates_weight(self, adapter_name: str, x: torch.Tensor) -> bool:
        """Whether the training forward is cheaper rotating the weight (see :class:`_RotatedLinear`).

        Only on a plain (unquantized, unstacked) linear base in the adapter's dtype, with
        grads on, and more tokens than output features.
        """
        base = self.base_layer
        if not (torch.is_grad_enabled() and base is self.get_base_layer() and is_linear_like(base)
                and not is_quantized(base) and not has_hooks(base)):
            return False
        weight = base.weight
        tokens = x.numel() // max(x.shape[-1], 1)
        return (tokens > self.out_features and x.dtype == weight.dtype == self.rotation(adapter_name).weight.dtype
                and x.shape[-1] == self.in_features)

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
