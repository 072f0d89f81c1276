"""DoRA: the weight split into a trained magnitude ``m`` and a direction ``(W + s B A) / ||W + s B A||``.

The output is ``m / ||W + s B A|| * (W + s B A) x``, computed from the base output that was
already paid for: ``result + (k - 1) * W x + k * s * B A x`` with ``k = m / norm``. As in the
DoRA paper (section 4.3) and HF PEFT, the norm is detached, so no gradient flows through it.
Norms are per output row of the (fan_out, fan_in, ...) "dense" layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layer import Conv, Embedding, Linear, LoraLayer


class DoraMagnitude(nn.Module):
    """The magnitude vector, held as ``.weight`` so parameter names match HF PEFT's
    (``lora_magnitude_vector.<adapter>.weight``); files store it as ``...lora_magnitude_vector``."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)


def weight_norm(layer: LoraLayer, dense_weight: torch.Tensor, dense_delta: torch.Tensor) -> torch.Tensor:
    """Row norms of ``W + delta``, shaped like the magnitude vector HF PEFT stores."""
    norm = (dense_weight + dense_delta.to(dense_weight.dtype)).flatten(1).norm(p=2, dim=1)
    if dense_weight.dim() > 2:  # conv: (1, out_channels, 1, ...)
        norm = norm.view(1, -1, *([1] * (dense_weight.dim() - 2)))
    return norm


def row_scale(layer: LoraLayer, adapter_name: str, norm: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``m / norm`` shaped to scale the rows of a dense weight."""
    scale = layer.lora_magnitude_vector[adapter_name].weight / norm
    return scale.reshape(-1, *([1] * (dense.dim() - 1)))


def _scale(layer: LoraLayer, adapter_name: str) -> torch.Tensor:
    norm = weight_norm(layer, layer.dense_base_weight(), layer.dense_delta(adapter_name).detach()).detach()
    return layer.lora_magnitude_vector[adapter_name].weight / norm


def _recompute_base(layer: LoraLayer, adapter_name: str) -> bool:
    """With active dropout the base path must see the same dropped input as the LoRA path."""
    return layer.training and layer.lora_dropout[adapter_name].__class__.__name__ != "Identity"


def linear_output(layer: Linear, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    scale = _scale(layer, adapter_name)
    dropped = layer.lora_dropout[adapter_name](x)
    lora = F.linear(F.linear(dropped, layer.lora_A[adapter_name].weight), layer.lora_B[adapter_name].weight)
    if _recompute_base(layer, adapter_name):
        base = F.linear(dropped, layer.dense_base_weight().to(x.dtype))
    else:
        bias = getattr(layer.base_layer, "bias", None)
        base = result - bias if bias is not None else result
    return result + (scale - 1) * base + scale * lora * layer.scaling[adapter_name]


def embedding_output(layer: Embedding, adapter_name: str, result: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    scale = _scale(layer, adapter_name)
    return scale * result + scale * update


def conv_output(layer: Conv, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    scale = _scale(layer, adapter_name)  # (1, out, 1, ...)
    base_layer = layer.base_layer
    dropped = layer.lora_dropout[adapter_name](x)
    lora = layer.lora_B[adapter_name](layer.lora_A[adapter_name](dropped))
    if _recompute_base(layer, adapter_name):
        base = base_layer._conv_forward(dropped, base_layer.weight, None)
    else:
        bias = base_layer.bias
        base = result - bias.view(1, -1, *([1] * (result.dim() - 2))) if bias is not None else result
    return result + (scale - 1) * base + scale * lora * layer.scaling[adapter_name]
