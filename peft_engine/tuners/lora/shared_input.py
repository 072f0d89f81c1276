"""Sibling LoRA linears that read the same input (q/k/v, gate/up) share their rank-r GEMMs.

Why: a model calls ``q_proj``, ``k_proj`` and ``v_proj`` on one hidden state, one after the
other. Fused one layer at a time (:mod:`.fused`) each pays its own skinny ``x A^T`` forward,
``g^T x`` and ``g A`` backward GEMMs over the (tokens, features) activations, and autograd
sums the three input gradients in two more passes. With ``A = [A_1; A_2; A_3]`` (ranks
stacked) and ``G = [s_1 dy_1 B_1 | s_2 dy_2 B_2 | s_3 dy_3 B_3]``, one node computes

    h   = x A^T                     one GEMM for every member's down-projection
    y_i = x W_i^T + b_i + s_i h_i B_i^T
    dx  = sum_i dy_i W_i + G A      one buffer, beta=1 addmms
    dA  = G^T x,   dB_i = s_i dy_i^T h_i

Measured per attention block of SmolLM2 (576 -> 576/192/192, r=16, 512 tokens, two threads):
about 0.9-1.2 ms over the frozen q/k/v against 1.8-2.2 ms for three fused layers.

How it runs inside an unchanged model: the first member called computes every member's output
and keeps the others' until they are called with the very same input tensor (same object and
version, same adapter tensors). A member called on another input, or not called
before the next group computation, shows that these siblings do not share an input here
(cross-attention's ``k``/``v``, cached keys in generation): the group then switches itself off
and every member runs alone. Only the plain fused case groups (one active LoRA adapter, no
dropout at work, no DoRA, frozen nn.Linear bases, one dtype), and only while autograd records
(training steps): the gain is in the backward, and inference keeps the one-layer results bit for
bit (a GEMM over stacked ranks rounds differently in the last bits). The rest is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...targets import SHARED_INPUT_SIBLINGS

if TYPE_CHECKING:
    from .layer import Linear


class FusedOperands(NamedTuple):
    """What a LoRA linear's fused forward multiplies by (see ``Linear.fused_operands``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None  # DoRA's, else None

    def same_as(self, other: FusedOperands) -> bool:
        return (self.weight is other.weight and self.bias is other.bias and self.a is other.a
                and self.b is other.b and self.scaling == other.scaling and self.magnitude is other.magnitude)


def _groupable(ops: FusedOperands | None) -> bool:
    return (ops is not None and ops.magnitude is None and not ops.weight.requires_grad
            and (ops.bias is None or not ops.bias.requires_grad))


class _Pending(NamedTuple):
    x: torch.Tensor
    version: int
    outputs: dict[Linear, tuple[torch.Tensor, FusedOperands]]  # member -> (output, operands used)


class SharedInputGroup:
    """Members of one parent module that the model calls on the same input; see the module docstring."""

    def __init__(self, members: Sequence[Linear]) -> None:
        self.members = tuple(members)
        self.enabled = True
        self._pending: _Pending | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Outputs in flight belong to one forward pass; a copy or pickle of the model starts clean.
        return {**self.__dict__, "_pending": None}

    def output(self, member: Linear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output on ``x``, computed with its siblings', or None to run it alone."""
        if not self.enabled or not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return None
        pending = self._pending
        if pending is not None:
            self._pending = None
            kept = pending.outputs.pop(member, None)
            if kept is None or pending.x is not x or pending.version != x._version:
                self.enabled = False  # an output was computed for a call that never came
                return None
            if pending.outputs:  # siblings still to come on this input
                self._pending = pending
            out, ops = kept
            now = member.fused_operands(x)
            return out if now is not None and now.same_as(ops) else None
        operands = [m.fused_operands(x) for m in self.members]
        if not all(map(_groupable, operands)):
            return None
        outputs = shared_input_lora(x, operands)  # type: ignore[arg-type]
        self._pending = _Pending(x, x._version, {m: (out, ops) for m, out, ops in zip(self.members, outputs, operands)
                                                 if m is not member})
        return outputs[self.members.index(member)]


def link_shared_inputs(model: nn.Module, layer_type: type[Linear]) -> None:
    """Group sibling ``layer_type`` layers (on plain nn.Linear bases) named in ``SHARED_INPUT_SIBLINGS``."""
    for parent in model.modules():
        children = parent._modules
        for names in SHARED_INPUT_SIBLINGS:
            members = [children[n] for n in names if type(children.get(n)) is layer_type]
            members = [m for m in members if type(m.base_layer) is nn.Linear]
            for m in members:
                m._shared_input = None
            if len(members) >= 2:
                group = SharedInputGroup(members)
                for m in members:
                    m._shared_input = group


def groups_in(model: nn.Module) -> list[SharedInputGroup]:
    """The model's sibling groups, each once (to inspect them or switch them off)."""
    found = {id(g): g for m in model.modules() if (g := getattr(m, "_shared_input", None)) is not None}
    return list(found.values())


def _forward(x2: torch.Tensor, a_cat: torch.Tensor, weights: Sequence[torch.Tensor],
             biases: Sequence[torch.Tensor | None], bs: Sequence[torch.Tensor], scalings: Sequence[float],
             ranks: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    h = F.linear(x2, a_cat)
    outs = []
    for w, bias, b, s, h_i in zip(weights, biases, bs, scalings, h.split_with_sizes(ranks, 1)):
        y = F.linear(x2, w, bias)
        y.addmm_(h_i, b.t(), alpha=s)
        outs.append(y)
    return h, outs


class _SharedInputLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scalings: tuple[float, ...], *tensors: torch.Tensor | None
                ) -> tuple[torch.Tensor, ...]:
        n = len(scalings)
        weights, biases, as_, bs = tensors[:n], tensors[n:2 * n], tensors[2 * n:3 * n], tensors[3 * n:]
        ranks = [b.shape[1] for b in bs]
        x2 = x.reshape(-1, x.shape[-1])
        a_cat = torch.cat(as_)
        h, outs = _forward(x2, a_cat, weights, biases, bs, scalings, ranks)
        ctx.save_for_backward(x2, h, a_cat, *weights, *bs)
        ctx.scalings, ctx.ranks, ctx.x_shape = scalings, ranks, x.shape
        # An output nobody used gets no gradient (None), so its adapter's tensors get none either,
        # exactly as when that member is never called.
        ctx.set_materialize_grads(False)
        lead = x.shape[:-1]
        return tuple(y.view(*lead, y.shape[1]) for y in outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x2, h, a_cat, *rest = ctx.saved_tensors
        scalings, ranks = ctx.scalings, ctx.ranks
        n = len(scalings)
        weights, bs = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        need_a, need_b = needs[2 + 2 * n:2 + 3 * n], needs[2 + 3 * n:]
        grad_as: list[torch.Tensor | None] = [None] * n
        grad_bs: list[torch.Tensor | None] = [None] * n
        used = [i for i, grad in enumerate(grads) if grad is not None]
        dys = [grad.reshape(-1, grad.shape[-1]) if grad is not None else None for grad in grads]
        if any(need_b):
            hs = h.split_with_sizes(ranks, 1)
            for i in used:
                if need_b[i]:  # beta=0: ``b`` only gives the shape
                    grad_bs[i] = torch.addmm(bs[i], dys[i].t(), hs[i], beta=0, alpha=scalings[i])
        grad_x = None
        if needs[0] or any(need_a):
            # G = [s_i dy_i B_i] over the used members, (tokens, their ranks), with A over the same ranks.
            # One scaling for all (the usual config) is applied as the GEMMs' alpha, not as a pass over G.
            first = used[0]
            shared = all(scalings[i] == scalings[first] for i in used)
            alpha = scalings[first] if shared else 1.0
            parts = [torch.mm(dys[i], bs[i]) if shared else torch.mm(dys[i], bs[i]).mul_(scalings[i]) for i in used]
            all_used = len(used) == n
            g = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
            a_used = a_cat if all_used else torch.cat(
                [part for i, part in enumerate(a_cat.split_with_sizes(ranks)) if i in used])
            if needs[0]:
                grad_x = torch.mm(dys[first], weights[first])
                for i in used[1:]:
                    grad_x.addmm_(dys[i], weights[i])
                grad_x.addmm_(g, a_used, alpha=alpha)
                grad_x = grad_x.view(ctx.x_shape)
            if any(need_a):  # beta=0: ``a_used`` only gives the shape
                grad_a_used = torch.addmm(a_used, g.t(), x2, beta=0, alpha=alpha)
                pieces = grad_a_used.split_with_sizes(ranks if all_used else [ranks[i] for i in used])
                for i, grad_a in zip(used, pieces):
                    if need_a[i]:
                        grad_as[i] = grad_a
        return (grad_x, None, *([None] * (2 * n)), *grad_as, *grad_bs)


def shared_input_lora(x: torch.Tensor, operands: Sequence[FusedOperands]) -> tuple[torch.Tensor, ...]:
    """Every member's ``x W_i^T + b_i + s_i (x A_i^T) B_i^T``, one autograd node (frozen ``W_i``, ``b_i``)."""
    weights = [ops.weight for ops in operands]
    biases = [ops.bias for ops in operands]
    as_ = [ops.a for ops in operands]
    bs = [ops.b for ops in operands]
    scalings = tuple(ops.scaling for ops in operands)
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in as_ + bs)):
        return _SharedInputLora.apply(x, scalings, *weights, *biases, *as_, *bs)
    _, outs = _forward(x.reshape(-1, x.shape[-1]), torch.cat(as_), weights, biases, bs, scalings,
                       [b.shape[1] for b in bs])
    return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in outs)
