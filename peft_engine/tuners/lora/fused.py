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

With LoRA dropout in training, the adapter reads ``x_d = x * k`` with ``k = keep / (1 - p)`` (nn.Dropout's
mask, drawn from the same random stream, stored as floats), ``h = x_d A^T`` and ``dA = s g^T x_d``,
and the input gradient takes the mask in the pass that adds it: ``dx += s * k * (g A)`` (one
addcmul, where autograd would run the dropout's backward and then a sum, each into a new buffer;
per layer ~9% less overhead than the unfused code in a one-thread A/B on a busy machine). The mask
is kept in x's dtype: on CPU a bool mask makes the addcmul a mixed-dtype pass 5x slower; on a GPU
in bf16 it costs one byte per input element more than nn.Dropout's bool mask.

DoRA (``m / ||W + s B A|| * (W + s B A) x + b``, the norm detached as in the paper and HF PEFT)
builds ``W' = W + s B A`` once per step with a single addmm, takes its row norms, and runs one
GEMM over the activations instead of the base output plus four full-size elementwise ops:

    y0 = x W'^T,  out = k * y0 + b   with k = m / ||W'||
    dx = dy (k W')                  (k W' is W' scaled in place after the forward used it)
    dm = sum_t(dy * y0) / ||W'||,   g = dy (k B),   dA = s g^T x,   dB = s k dy^T h

Only the plain case takes this path (see ``Linear.fused_operands``); everything else (DoRA with
dropout in training, several active adapters, quantized or nested bases, autocast, hooks) keeps the
unfused code, which is also the reference tests/test_lora_fused.py compares against. These
Functions define no ``setup_context``/``vmap``, so ``torch.func`` transforms are not supported
on the fused path (gradient checkpointing is: it re-runs the forward).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _dropout_mask(x2: torch.Tensor, p: float) -> torch.Tensor | None:
    """nn.Dropout's scaled keep mask (``keep / (1 - p)``), drawn as its CPU kernel draws it (the same
    random stream); kept in x's dtype so the backward's multiply-add stays one vectorised pass."""
    return torch.empty_like(x2).bernoulli_(1 - p).div_(1 - p) if p > 0 else None


def _lora_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                  b: torch.Tensor, scaling: float, fan_in_fan_out: bool, keep: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, h, x_in)``: the output, ``h = x_in A^T`` and the adapter's input ``x_in`` (x, or x after dropout)."""
    x_in = x2 if keep is None else x2 * keep
    # Small GEMMs next to the large one that reads the same operand: x is still in cache for h,
    # and y for the addmm (measured ~0.1 ms a layer faster than h after the base GEMM).
    h = F.linear(x_in, a)
    if fan_in_fan_out:  # transformers' Conv1D: weight is (in, out)
        y = torch.mm(x2, weight) if bias is None else torch.addmm(bias, x2, weight)
    else:
        y = F.linear(x2, weight, bias)
    y.addmm_(h, b.t(), alpha=scaling)
    return y, h, x_in


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, fan_in_fan_out: bool, p: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        keep = _dropout_mask(x2, p)
        y, h, x_in = _lora_forward(x2, weight, bias, a, b, scaling, fan_in_fan_out, keep)
        # With dropout, x itself is needed only for a trainable base weight's gradient (unfused
        # code would not keep it either); the adapter's gradients read x_in.
        ctx.save_for_backward(x2 if keep is None or ctx.needs_input_grad[1] else None, h, weight, a, b, x_in, keep)
        ctx.scaling, ctx.fan_in_fan_out, ctx.x_shape = scaling, fan_in_fan_out, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, weight, a, b, x_in, keep = ctx.saved_tensors
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
            if keep is None:
                grad_x.addmm_(g, a, alpha=s)
            else:  # through the dropout: the mask and its 1/(1-p) in the same pass as the sum
                grad_x.addcmul_(torch.mm(g, a), keep, value=s)
            grad_x = grad_x.view(ctx.x_shape)
        if need_a:
            grad_a = torch.addmm(a, g.t(), x_in, beta=0, alpha=s)
        if need_w:
            grad_w = torch.mm(x2.t(), dy) if fan_in_fan_out else torch.mm(dy.t(), x2)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scaling: float, fan_in_fan_out: bool, dropout: float = 0.0) -> torch.Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T`` (``x W + b ...`` for Conv1D weights), one autograd node.

    ``dropout`` is the probability in force (0 outside training); its masks are nn.Dropout's on CPU.
    """
    tensors = (x, weight, bias, a, b)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _LoraLinear.apply(x, weight, bias, a, b, scaling, fan_in_fan_out, dropout)
    x2 = x.reshape(-1, x.shape[-1])
    y, _, _ = _lora_forward(x2, weight, bias, a, b, scaling, fan_in_fan_out, _dropout_mask(x2, dropout))
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
