"""LoHa layers: ``delta W = s * (W1a W1b) ⊙ (W2a W2b)`` with ``s = alpha / r``.

The Hadamard product of two rank-r matrices has rank at most r², and its factors are
explicit: with the row-wise Khatri-Rao products ``Ka[o, (p, q)] = W1a[o, p] W2a[o, q]`` and
``Kb[(p, q), i] = W1b[p, i] W2b[q, i]``, ``(W1a W1b) ⊙ (W2a W2b) = Ka Kb``. So a Linear layer's
update is ``s * Ka (Kb x)``: r² (in + out) multiply-adds per token and no (out x in) matrix.
That is cheaper than building the dense delta (2 r in out) and applying it (in out per token)
whenever r² (in + out) (T + 1) < in out (T + 2r) for T tokens, which the forward checks
(small ranks on wide layers — the usual case); otherwise it takes the dense route.
Convolutions build the kernel delta, optionally from the CP (Tucker) form of FedPara
(``use_effective_conv2d``: cores ``hada_t1``, ``hada_t2``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..lycoris import LycorisLayer, lycoris_target
from .config import LoHaConfig


class LoHaLayer(LycorisLayer):
    adapter_layer_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for attr in self.adapter_layer_names:
            setattr(self, attr, nn.ParameterDict())

    def update_layer(self, adapter_name: str, config: LoHaConfig, module_name: str) -> None:
        r = self.set_hyperparameters(adapter_name, config, module_name, scale_drop=True)
        if self.conv_fn is None:
            out_f, in_f = self.out_features, self.in_features
            shapes = {"hada_w1_a": (out_f, r), "hada_w1_b": (r, in_f), "hada_w2_a": (out_f, r), "hada_w2_b": (r, in_f)}
        else:
            out_c, in_c, kernel = self.conv_dims()
            # A 1-wide kernel gains nothing from the CP form (HF PEFT turns it off there too).
            if config.use_effective_conv2d and math.prod(kernel) > 1:
                core = (r, r, kernel[0], kernel[1] if len(kernel) > 1 else 1)
                shapes = {"hada_t1": core, "hada_t2": core, "hada_w1_a": (r, out_c), "hada_w1_b": (r, in_c),
                          "hada_w2_a": (r, out_c), "hada_w2_b": (r, in_c)}
            else:
                flat = in_c * math.prod(kernel)
                shapes = {"hada_w1_a": (out_c, r), "hada_w1_b": (r, flat), "hada_w2_a": (out_c, r), "hada_w2_b": (r, flat)}
        for attr, shape in shapes.items():
            tensor = torch.empty(shape)
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
            getattr(self, attr)[adapter_name] = nn.Parameter(tensor)
        if config.init_weights:  # one zero factor: the adapter starts as a no-op
            nn.init.zeros_(self.hada_w2_b[adapter_name])
        self.finish_update(adapter_name)

    def _factors(self, adapter_name: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, a)[adapter_name] for a in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))

    def dense_delta(self, adapter_name: str) -> torch.Tensor:
        w1a, w1b, w2a, w2b = self._factors(adapter_name)
        scale = self.scaling[adapter_name]
        if adapter_name in self.hada_t1:
            rebuild1 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t1[adapter_name], w1b, w1a)
            rebuild2 = torch.einsum("ijkl,jr,ip->prkl", self.hada_t2[adapter_name], w2b, w2a)
            delta = rebuild1 * rebuild2 * scale
        else:
            delta = ((w1a @ w1b) * (w2a @ w2b)) * scale
        if self.conv_fn is not None:
            delta = delta.reshape(self.get_base_layer().weight.shape)
        return delta

    def add_delta(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        factors = self._factors(adapter_name)
        if (self.rank_dropout[adapter_name] or adapter_name in self.hada_t1
                or any(f.dtype != weight.dtype for f in factors)):
            return super().add_delta(adapter_name, weight)
        return HadamardSum.apply(weight, *factors, self.scaling[adapter_name])

    def khatri_rao(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ka, Kb) with ``(W1a W1b) ⊙ (W2a W2b) == Ka @ Kb``; shapes (out, r²) and (r², in)."""
        w1a, w1b, w2a, w2b = self._factors(adapter_name)
        ka = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
        kb = (w1b[:, None, :] * w2b[None, :, :]).flatten(0, 1)
        return ka, kb

    def linear_delta_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        r, n_in, n_out = self.r[adapter_name], self.in_features, self.out_features
        flat = x.reshape(-1, n_in).to(self.hada_w1_a[adapter_name].dtype)  # 2-D: one GEMM per factor
        tokens = flat.shape[0]
        if r * r * (n_in + n_out) * (tokens + 1) < n_in * n_out * (tokens + 2 * r):
            ka, kb = self.khatri_rao(adapter_name)
            update = (flat @ kb.T) @ (ka.T * self.scaling[adapter_name])
        else:
            update = flat @ self.dense_delta(adapter_name).T
        drop = self.row_drop(adapter_name, n_out, update)
        update = update.view(*x.shape[:-1], n_out)
        return update if drop is None else update * drop


class HadamardSum(torch.autograd.Function):
    """``W + s (W1a W1b) ⊙ (W2a W2b)`` as one node, for training through the summed weight.

    Why: autograd would run the product, the scaling and the sum as three passes over an
    (out x in) matrix, and three more backward; here the forward is one ``addcmul`` and the
    backward two (the gradient times each product; the scale goes on the rank-r results),
    reusing the two products saved from the forward. ``W`` (the frozen base, or the sum so far with other
    adapters) gets the gradient unchanged.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor,
                w2b: torch.Tensor, scale: float) -> torch.Tensor:
        p1, p2 = w1a @ w1b, w2a @ w2b
        ctx.save_for_backward(w1a, w1b, w2a, w2b, p1, p2)
        ctx.scale = scale
        return torch.addcmul(weight, p1, p2, value=scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b, p1, p2 = ctx.saved_tensors
        g1, g2, s = grad * p2, grad * p1, ctx.scale  # d(loss)/d(W1a W1b) and d(loss)/d(W2a W2b), over s
        return (grad if ctx.needs_input_grad[0] else None,
                (g1 @ w1b.T).mul_(s), (w1a.T @ g1).mul_(s), (g2 @ w2b.T).mul_(s), (w2a.T @ g2).mul_(s), None)


def create_loha_layer(target: nn.Module, adapter_name: str, config: LoHaConfig, module_name: str) -> LoHaLayer | None:
    if not lycoris_target(target):
        return None
    layer = LoHaLayer(target)
    layer.update_layer(adapter_name, config, module_name)
    return layer
