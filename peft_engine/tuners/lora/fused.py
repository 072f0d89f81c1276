"""LoRA's update ``result + s * (x A^T) B^T`` as one autograd node.

Why: the arithmetic of a LoRA update is a few percent of a training step, yet written as
``linear`` + ``addmm`` + reshapes it puts four nodes per layer on the autograd tape, each
with its own saved tensors, allocations and dispatch. Written out by hand the backward is
four small matmuls, with the rank-sized product ``g = dy B`` computed once and shared:

    g  = dy B                       (tokens, r)
    dA = s g^T x                    (r, in)
    dB = s dy^T h,  h = x A^T       (out, r)   h is kept from the forward
    dx = s g A                      (tokens, in)
    d result = dy
"""

from __future__ import annotations

from typing import Any

import torch


class _LoraUpdate(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ a.T
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h, b.T, alpha=scaling)
        ctx.save_for_backward(x2, h, a, b)
        ctx.scaling = scaling
        ctx.x_shape = x.shape
        return out.view(result.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, h, a, b = ctx.saved_tensors
        s = ctx.scaling
        dy = grad.reshape(-1, grad.shape[-1]).to(h.dtype)
        need_result, need_x, need_a, need_b = ctx.needs_input_grad[:4]
        g = dy @ b if (need_x or need_a) else None
        grad_x = (g @ a).mul_(s).view(ctx.x_shape) if need_x else None
        grad_a = (g.T @ x2).mul_(s) if need_a else None
        grad_b = (dy.T @ h).mul_(s) if need_b else None
        return (grad if need_result else None), grad_x, grad_a, grad_b, None


def lora_update(result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """``result + scaling * x @ a.T @ b.T`` over the last dimension, differentiable in all four tensors."""
    return _LoraUpdate.apply(result, x, a, b, scaling)
