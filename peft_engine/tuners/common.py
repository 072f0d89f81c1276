"""Small pieces the methods share: layer sizes, quantized base weights, hooks, pattern lookup.

Kept apart from :mod:`.base` because they are helpers, not protocol: how wide a module is,
how to read (dequantize) and write back (requantize) the weight of a bitsandbytes layer for
a merge, HF PEFT's ``rank_pattern`` / ``alpha_pattern`` matching, and running a
non-additive layer (one that changes its input or scales its output) per example when a
batch mixes adapters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..targets import Conv1D
from .base import AdapterLayer

# ---- hooks ----------------------------------------------------------------------------------
# Hooks registered for every module (``register_module_forward_hook`` and the like). torch adds to and
# removes from these dicts in place, so the objects can be kept.
_GLOBAL_HOOKS = tuple(getattr(nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks are set on ``module`` or on every module.

    A fused training path computes with a base layer's weight instead of calling the layer; where
    hooks would see that call, the base must run as a module and the fused path steps aside.
    """
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or any(_GLOBAL_HOOKS))


# ---- bitsandbytes ---------------------------------------------------------------------------
def _bnb_kind(module: nn.Module) -> str | None:
    """"4bit" / "8bit" for bitsandbytes Linear4bit / Linear8bitLt, without importing bitsandbytes."""
    weight = getattr(module, "weight", None)
    kind = type(weight).__name__ if weight is not None else ""
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(kind)


def is_quantized(module: nn.Module) -> bool:
    return _bnb_kind(module) is not None


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float weight of a (possibly bitsandbytes-quantized) layer, in its stored layout."""
    kind = _bnb_kind(module)
    if kind is None:
        return module.weight.data
    weight = module.weight
    if kind == "4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    # Int8: row-wise absmax scales SCB live on the weight until the first forward, then on the state.
    scb = module.state.SCB if getattr(module.state, "SCB", None) is not None else weight.SCB
    return weight.data.float() * scb.float().view(-1, 1) / 127.0


def write_weight(module: nn.Module, new: torch.Tensor) -> None:
    """Store ``new`` as the module's weight, quantizing again for bitsandbytes layers."""
    kind = _bnb_kind(module)
    if kind is None:
        module.weight.data = new.to(module.weight.dtype)
        return
    import bitsandbytes as bnb

    weight = module.weight
    device = weight.device
    if kind == "4bit":
        kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k not in ("data", "quant_state")}
        kwargs["bnb_quantized"] = False
        kwargs["requires_grad"] = False
        dtype = getattr(weight.quant_state, "dtype", None) or torch.float32
        module.weight = bnb.nn.Params4bit(new.detach().to("cpu", dtype), **kwargs).to(device)
    else:
        module.weight = bnb.nn.Int8Params(new.detach().to("cpu"), requires_grad=False,
                                          has_fp16_weights=weight.has_fp16_weights).to(device)
        module.state.SCB = None
        reset = getattr(module.state, "reset_grads", None)
        if callable(reset):
            reset()


# ---- shapes ---------------------------------------------------------------------------------
def in_out_features(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear, transformers Conv1D, bitsandbytes linear or conv layer."""
    if isinstance(module, Conv1D):
        rows, cols = module.weight.shape
        return rows, cols
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.in_features, module.out_features
    raise TypeError(f"cannot tell the input/output size of {type(module).__name__}")


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes linears subclass it) or transformers' Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


# ---- per-example adapters for layers that are not "base + delta" ------------------------------
def grouped_forward(names: Sequence[str], x: torch.Tensor, known: Sequence[str],
                    run: Callable[[list[str], torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``run(active_names, x_sub)`` once per adapter on its examples and reassemble the batch.

    For layers whose adapter changes the input or rescales the output (IA3, OFT, BOFT) the
    base layer's output cannot be shared between adapters, so each group runs on its own.
    """
    if len(names) != x.shape[0]:
        raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]}")
    out: torch.Tensor | None = None
    for name in dict.fromkeys(names):
        index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
        # The tuner has checked the names; an adapter this layer does not hold leaves its rows as the base.
        sub = run([name] if name in known else [], x.index_select(0, index))
        if out is None:
            out = sub.new_empty((x.shape[0], *sub.shape[1:]))
        out.index_copy_(0, index, sub)
    assert out is not None
    return out


class MethodLayer(AdapterLayer):
    """An adapter layer whose base may be a bitsandbytes layer or another method's adapter layer.

    Merges read the base weight dequantized and write it back requantized, always on the
    original module at the bottom of a (mixed-model) stack of adapter layers.
    """

    def get_base_weight(self) -> torch.Tensor:
        return dequantized_weight(self.get_base_layer())

    def set_base_weight(self, weight: torch.Tensor) -> None:
        write_weight(self.get_base_layer(), weight)

    def base_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where new adapter tensors go: the base weight's device, and its dtype if floating."""
        weight = self.get_base_layer().weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        return weight.device, dtype


def sync_fan_in_fan_out(config: Any, target: nn.Module) -> None:
    """Record the layout the layer really has, as HF PEFT does (Conv1D -> True, Linear -> False).

    The layers read the layout from the module itself; the config is corrected only so that
    the saved ``adapter_config.json`` says what HF PEFT would write.
    """
    if not hasattr(config, "fan_in_fan_out"):
        return
    wanted = isinstance(target, Conv1D)
    if is_linear_like(target) and config.fan_in_fan_out != wanted:
        warnings.warn(f"fan_in_fan_out={config.fan_in_fan_out} does not fit {type(target).__name__}; "
                      f"setting fan_in_fan_out={wanted}", stacklevel=3)
        config.fan_in_fan_out = wanted


class ComposedMethodLayer(MethodLayer):
    """A method whose active adapters act together on one input (IA3 scales, OFT/BOFT rotations).

    Subclasses provide ``_apply(adapter_names, x, ...)``; :meth:`AdapterLayer.forward` routes
    disabled and merged layers as for every method, and mixed batches group rows per adapter.
    """

    def _apply(self, adapter_names: Sequence[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def _active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._apply(self.active_adapters, x, *args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return grouped_forward(self.batch_adapter_names, x, self.adapter_names,
                               lambda names, xs: self._apply(names, xs, *args, **kwargs))
