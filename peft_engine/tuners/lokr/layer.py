"""LoKr layers: ``delta W = s * kron(W1, W2)`` with ``s = alpha / r``.

For a weight of shape (a·b, c·d), W1 is (a, c) and W2 is (b, d); W2 (and W1 with
``decompose_both``) is low-rank ``W_a W_b`` when the rank is small next to its size.
The Kronecker product never has to exist: reading x (length c·d) as a c x d matrix X,
``kron(W1, W2) x`` is ``W1 X W2^T`` read back row by row (the identity
``(W1 ⊗ W2) vec(X) = vec(W2 X W1^T)`` in row-major form). A Linear update then costs
``c·d·b + a·c·b`` multiply-adds per token instead of ``a·b·c·d``, plus nothing to build.
Convolutions build the (small) kernel delta, W2 optionally in CP form (``lokr_t2``).
Training on a Linear runs one GEMM with ``W + delta`` (see :mod:`..lycoris`); with a single
adapter and no rank dropout its backward contracts the gradient with the factors
(:class:`_KronMergedLinear`) instead of forming the (out x in) weight gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..lycoris import LycorisLayer, lycoris_target
from .config import LoKrConfig


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m * n == dimension, as LyCORIS does.

    With ``factor > 0`` dividing the dimension: (factor, dimension // factor). Otherwise the
    pair is grown from (1, dimension) while its sum does not increase and m stays <= factor
    (any size for -1), i.e. the divisor pair closest to the square root.
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        other = dimension // candidate
        if candidate + other > m + n or candidate > limit:
            break
        m, n = candidate, other
    return (n, m) if m > n else (m, n)


class LoKrLayer(LycorisLayer):
    adapter_layer_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())
        # (a, b, c, d): out = a * b, in = c * d, W1 is (a, c), W2 is (b, d)
        self.kron_shape: dict[str, tuple[int, int, int, int]] = {}

    def update_layer(self, adapter_name: str, config: LoKrConfig, module_name: str) -> None:
        r = self.set_hyperparameters(adapter_name, config, module_name, scale_drop=config.rank_dropout_scale)
        if self.conv_fn is None:
            out_dim, in_dim, kernel = self.out_features, self.in_features, ()
        else:
            out_dim, in_dim, kernel = self.conv_dims()
        a, b = factorization(out_dim, config.decompose_factor)
        c, d = factorization(in_dim, config.decompose_factor)
        self.kron_shape[adapter_name] = (a, b, c, d)
        full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        full_w2 = r >= max(b, d) / 2
        cp = bool(kernel) and config.use_effective_conv2d and math.prod(kernel) > 1
        shapes: dict[str, tuple[int, ...]] = {}
        shapes.update({"lokr_w1": (a, c)} if full_w1 else {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)})
        if full_w2:
            shapes["lokr_w2"] = (b, d, *kernel)
        elif cp:
            shapes.update({"lokr_t2": (r, r, kernel[0], kernel[1] if len(kernel) > 1 else 1),
                           "lokr_w2_a": (r, b), "lokr_w2_b": (r, d)})
        else:
            shapes.update({"lokr_w2_a": (b, r), "lokr_w2_b": (r, d * math.prod(kernel))})
        for attr, shape in shapes.items():
            tensor = torch.empty(shape)
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            getattr(self, attr)[adapter_name] = nn.Parameter(tensor)
        # Start as a no-op: HF PEFT zeroes W1 (or W1a); the "lycoris" way zeroes W2 (or W2b).
        if config.init_weights == "lycoris":
            nn.init.zeros_(self.lokr_w2[adapter_name] if full_w2 else self.lokr_w2_b[adapter_name])
        elif config.init_weights:
            nn.init.zeros_(self.lokr_w1[adapter_name] if full_w1 else self.lokr_w1_a[adapter_name])
        self.finish_update(adapter_name)

    def delete_adapter_state(self, adapter_name: str) -> None:
        super().delete_adapter_state(adapter_name)
        self.kron_shape.pop(adapter_name, None)

    def w1(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w1:
            return self.lokr_w1[adapter_name]
        return self.lokr_w1_a[adapter_name] @ self.lokr_w1_b[adapter_name]

    def w2(self, adapter_name: str) -> torch.Tensor:
        if adapter_name in self.lokr_w2:
            return self.lokr_w2[adapter_name]
        if adapter_name in self.lokr_t2:
            return torch.einsum("ijkl,ip,jr->prkl", self.lokr_t2[adapter_name],
                                self.lokr_w2_a[adapter_name], self.lokr_w2_b[adapter_name])
        return self.lokr_w2_a[adapter_name] @ self.lokr_w2_b[adapter_name]

    def dense_delta(self, adapter_name: str) -> torch.Tensor:
        w1, w2 = self.w1(adapter_name), self.w2(adapter_name)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2.contiguous()) * self.scaling[adapter_name]
        return delta.reshape(self.get_base_layer().weight.shape) if self.conv_fn is not None else delta

    def _merged_forward(self, x: torch.Tensor) -> torch.Tensor:
        """One active adapter without rank dropout: the summed-weight GEMM with a factored backward.

        The generic summed-weight path gets W1/W2's gradients from the full (out x in) weight
        gradient ``g^T x`` (a GEMM as large as the layer) and reduces it through the Kronecker
        product; :class:`_KronMergedLinear` contracts ``g`` and ``x`` with the factors directly.
        """
        names = [n for n in self.active_adapters if n in self.adapter_names]
        if len(names) != 1 or self.rank_dropout[names[0]]:
            return super()._merged_forward(x)
        name = names[0]
        base = self.base_layer
        weight = base.weight.T if self.fan_in_fan_out else base.weight
        p = self.module_dropout[name]
        if p and torch.rand(1) <= p:  # the whole adapter is dropped for this step
            return F.linear(x.to(weight.dtype), weight, base.bias)
        return _KronMergedLinear.apply(x, weight, base.bias, self.w1(name), self.w2(name), self.scaling[name])

    def linear_delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = self.kron_shape[adapter_name]
        w1 = self.w1(adapter_name)
        tokens = x.numel() // (c * d)
        grid = x.reshape(tokens * c, d).to(w1.dtype)  # each token's input as a (c x d) matrix X
        if adapter_name in self.lokr_w2:
            right = grid @ self.lokr_w2[adapter_name].T  # X W2^T: (tokens * c, b)
        else:
            right = (grid @ self.lokr_w2_b[adapter_name].T) @ self.lokr_w2_a[adapter_name].T
        # W1 (X W2^T) as one GEMM over all tokens: (tokens * b, c) @ W1^T -> (tokens, b, a) -> (tokens, a, b)
        right = right.view(tokens, c, b).transpose(1, 2).reshape(tokens * b, c)
        update = (right @ (w1.T * self.scaling[adapter_name])).view(tokens, b, a).transpose(1, 2)
        update = update.reshape(*x.shape[:-1], a * b)
        drop = self.row_drop(adapter_name, a * b, update)
        return update if drop is None else update * drop


class _KronMergedLinear(torch.autograd.Function):
    """``F.linear(x, W + s * kron(W1, W2), bias)`` whose backward never forms the (out x in) weight gradient.

    With g read as (tokens, a, b) and x as (tokens, c, d) (``kron(W1, W2)[(i,j),(k,l)] = W1[i,k] W2[j,l]``):
    ``dW2 = s * sum_(t,i) g[t,i,:]^T (W1 X_t)[i,:]`` and ``dW1 = s * sum_t (G_t W2) X_t^T``: four GEMMs of
    ``tokens * in * b`` (or ``a``) multiply-adds instead of the ``tokens * out * in`` one for ``g^T x``
    followed by elementwise reductions over the (out x in) gradient. The forward is the summed
    weight's GEMM, as in :meth:`LycorisLayer._merged_forward` (same operations, same values).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, w1: torch.Tensor,
                w2: torch.Tensor, scaling: float) -> torch.Tensor:
        merged = weight + (torch.kron(w1, w2.contiguous()) * scaling).to(weight.dtype)
        ctx.save_for_backward(x, merged, w1, w2)
        ctx.scaling = scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x.to(merged.dtype), merged, bias)

    @staticmethod
    @once_differentiable  # the saved summed weight carries no graph to W1/W2: no double backward
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, merged, w1, w2 = ctx.saved_tensors
        (a, c), (b, d) = w1.shape, w2.shape
        g = grad.reshape(-1, a * b)
        grad_x = grad_weight = grad_bias = grad_w1 = grad_w2 = None
        if ctx.needs_input_grad[0]:
            grad_x = (g.to(merged.dtype) @ merged).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1]:  # a trainable base weight (not the usual case)
            grad_weight = (g.T.to(merged.dtype) @ x.reshape(-1, c * d).to(merged.dtype)).to(merged.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            rows = g.to(w1.dtype).reshape(-1, b)  # (tokens * a, b): row (t, i) is G_t[i, :]
            grid = x.to(w1.dtype).reshape(-1, c, d)  # X_t
            if ctx.needs_input_grad[4]:
                left = torch.bmm(w1.expand(grid.shape[0], a, c), grid).view(-1, d)  # (tokens * a, d): W1 X_t
                grad_w2 = (rows.T @ left) * ctx.scaling
            if ctx.needs_input_grad[3]:
                right = (rows @ w2).view(-1, a, d)  # G_t W2
                grad_w1 = torch.bmm(right, grid.transpose(1, 2)).sum(0) * ctx.scaling
        return grad_x, grad_weight, grad_bias, grad_w1, grad_w2, None


def create_lokr_layer(target: nn.Module, adapter_name: str, config: LoKrConfig, module_name: str) -> LoKrLayer | None:
    if not lycoris_target(target):
        return None
    layer = LoKrLayer(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer
