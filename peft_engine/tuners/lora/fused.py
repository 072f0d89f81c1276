"""The base linear and its LoRA / DoRA update as one autograd node (the common training case).

Why: besides LoRA's own small matmuls, what a layer pays over its frozen base is memory passes
over the (tokens, features) activations and per-op dispatch. Written as ``base(x)`` + ``linear``
+ ``addmm`` the tape holds three nodes that each hand back a full-size gradient for ``x``, which
autograd then sums into ``x.grad`` (one more allocation and pass). One node for base *and*
update computes, with ``h = x A^T`` (tokens, r) kept from the forward,

    y  = x W^T + b,  then  y += s h B^T        (addmm into the base output: no extra buffer)
    g  = dy B                                   (tokens, r), shared by dx and dA
    dx = dy W,  then  dx += s g A               (one buffer, beta=1 addmm)
    dA = s g^T x,   dB = s dy^T h               (s as the GEMMs' alpha: no scaling op at all)

That is the six matmuls LoRA needs and nothing else: per layer (SmolLM2's q_proj, r=16, 512
tokens, one thread, medians of interleaved rounds on a noisy machine) this measured 1.0-1.4 ms
over the frozen floor against 1.3-1.8 ms for the three-node version and 1.6-2.5 ms for HF PEFT.
A one-node update that left the base outside (``result`` in, ``result`` out) kept the second
``x`` gradient and measured slower than the three nodes.

DoRA (``m / ||W + s B A|| * (W + s B A) x + b``, the norm detached as in the paper and HF PEFT)
builds ``W' = W + s B A`` once per step with a single addmm, takes its row norms, and runs one
GEMM over the activations instead of the base output plus four full-size elementwise ops:

    y0 = x W'^T,  out = k * y0 + b   with k = m / ||W'||
    dx = dy (k W')                  (k W' is W' scaled in place after the forward used it)
    dm = sum_t(dy * y0) / ||W'||,   g = dy (k B),   dA = s g^T x,   dB = s k dy^T h

Only the plain case takes this path (see ``Linear.fused_operands``); everything else (dropout in
training, several active adapters, quantized or nested bases, autocast, hooks) keeps the
unfused code, which is also the reference tests/test_lora_fused.py compares against. These
Functions define no ``setup_context``/``vmap``, so ``torch.func`` transforms are not supported
on the fused path (gradient checkpointing is: it re-runs the forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _lora_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                  b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # Small GEMMs next to the large one that reads the same operand: x is still in cache for h,
    # and y for the addmm (measured ~0.1 ms a layer faster than h after the base GEMM).
    h = F.linear(x2, a)
    if fan_in_fan_out:  # transformers' Conv1D: weight is (in, out)
        y = torch.mm(x2, weight) if bias is None else torch.addmm(bias, x2, weight)
    else:
        y = F.linear(x2, weight, bias)
    y.addmm_(h, b.t(), alpha=scaling)
    return y, h


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        y, h = _lora_forward(x2, weight, bias, a, b, scaling, fan_in_fan_out)
        ctx.save_for_backward(x2, h, weight, a, b)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, a, b = ctx.saved_tensors
        s, fan_in_fan_out = ctx.scaling, ctx.fan_in_fan_out
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        dy = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        # Order: the reads of dy together while it is in cache, dx's addmm right after its GEMM.
        # beta=0: the first operand only gives the shape (it is not read); alpha applies s in the GEMM.
        g = torch.mm(dy, b) if (need_x or need_a) else None
        if need_b:
            grad_b = torch.addmm(b, dy.t(), h, beta=0, alpha=s)
        if need_bias:
            grad_bias = dy.sum(0)
        if need_x:
            grad_x = torch.mm(dy, weight.t() if fan_in_fan_out else weight)
            grad_x.addmm_(g, a, alpha=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = torch.addmm(a, g.t(), x2, beta=0, alpha=s)
        if need_w:
            grad_w = torch.mm(x2.t(), dy) if fan_in_fan_out else torch.mm(dy.t(), x2)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """``x W^T + b + scaling * (x A^T) B^T`` (``x W + b ...`` for Conv1D weights), one autograd node."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad or b.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LoraLinear.apply(x, weight, bias, a, b, scaling, fan_in_fan_out)
    y, _ = _lora_forward(x.reshape(-1, x.shape[-1]), weight, bias, a, b, scaling, fan_in_fan_out)
    return y.view(*x.shape[:-1], y.shape[-1])


def _dora_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor, scaling: float,
                 fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W' = W + s B A`` (out, in), its detached row norms, and ``k = m / norms``."""
    dense = weight.t() if fan_in_fan_out else weight
    combined = torch.addmm(dense, b, a, alpha=scaling)
    norm = torch.linalg.vector_norm(combined, dim=1)
    return combined, norm, magnitude / norm


class _DoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, magnitude: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        combined, norm, k = _dora_weight(weight, a, b, magnitude, scaling, fan_in_fan_out)
        h = F.linear(x2, a) if ctx.needs_input_grad[4] else None
        y0 = torch.mm(x2, combined.t())
        out = y0 * k if bias is None else torch.addcmul(bias, y0, k)
        # The backward's dx multiplies by k W' = the DoRA weight; W' is not needed past this point.
        combined.mul_(k.unsqueeze(1))
        ctx.save_for_backward(x2, h, y0, combined, a, b, norm, k)
        ctx.scaling, ctx.x_shape = scaling, x.shape
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, y0, scaled, a, b, norm, k = ctx.saved_tensors
        s = ctx.scaling
        need_x, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        dy = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = grad_m = None
        if need_b:
            grad_b = torch.mm(dy.t(), h).mul_(k.unsqueeze(1) * s)
        if need_m:
            grad_m = torch.linalg.vecdot(dy, y0, dim=0).div_(norm)
        if need_bias:
            grad_bias = dy.sum(0)
        if need_x:
            grad_x = torch.mm(dy, scaled).view(ctx.x_shape)
        if need_a:  # beta=0: ``a`` only gives the shape
            grad_a = torch.addmm(a, torch.mm(dy, b * k.unsqueeze(1)).t(), x2, beta=0, alpha=s)
        return grad_x, None, grad_bias, grad_a, grad_b, grad_m, None, None


def dora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, magnitude: torch.Tensor, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """DoRA's output ``m / ||W + s B A|| * (x (W + s B A)^T) + b``, one autograd node; ``weight`` must be frozen."""
    tensors = (x, bias, a, b, magnitude)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _DoraLinear.apply(x, weight, bias, a, b, magnitude, scaling, fan_in_fan_out)
    x2 = x.reshape(-1, x.shape[-1])
    combined, _, k = _dora_weight(weight, a, b, magnitude, scaling, fan_in_fan_out)
    combined.mul_(k.unsqueeze(1))  # without a backward, fold k into the weight: one GEMM, no output pass
    out = torch.mm(x2, combined.t()) if bias is None else torch.addmm(bias, x2, combined.t())
    return out.view(*x.shape[:-1], out.shape[-1])
