"""How a new LoRA adapter starts.

``True`` (HF PEFT's default): A Kaiming-uniform, B zero, so the model starts unchanged
(embeddings the other way round: A zero, B normal). ``"gaussian"``: A normal with std 1/r.
``False``: both random, for tests that need a non-trivial adapter. ``"pissa"`` and
``"olora"`` start the adapter on the principal (SVD) or orthonormal (QR) part of W and
subtract it from the base, so ``W_res + s B A == W``: the initial model equals the original.
``"loftq"`` alternates quantisation and SVD (see :mod:`peft_engine.quantization`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import LoraConfig
    from .layer import LoraLayer


def initialise(layer: LoraLayer, adapter_name: str, config: LoraConfig) -> None:
    init = config.init_lora_weights
    if init is False:
        _random(layer, adapter_name)
    elif init is True or init == "gaussian":
        _zero_delta(layer, adapter_name, gaussian=init == "gaussian")
    elif init in ("pissa", "olora"):
        _principal(layer, adapter_name, method=init)
    elif init == "loftq":
        from ...quantization import loftq_init  # imported lazily: pulls in bitsandbytes

        loftq_init(layer, adapter_name, config)
    else:  # pragma: no cover - the config validates the choice
        raise ValueError(f"init_lora_weights={init!r} is not supported")


def _random(layer: LoraLayer, adapter_name: str) -> None:
    if adapter_name in layer.lora_embedding_A:
        nn.init.normal_(layer.lora_embedding_A[adapter_name])
        nn.init.normal_(layer.lora_embedding_B[adapter_name])
    # nn.Linear / nn.ConvNd factors keep their own random default initialisation.


def _zero_delta(layer: LoraLayer, adapter_name: str, *, gaussian: bool) -> None:
    if adapter_name in layer.lora_embedding_A:
        nn.init.zeros_(layer.lora_embedding_A[adapter_name])
        nn.init.normal_(layer.lora_embedding_B[adapter_name])
        return
    a = layer.lora_A[adapter_name].weight
    if gaussian:
        nn.init.normal_(a, std=1 / layer.r[adapter_name])
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    nn.init.zeros_(layer.lora_B[adapter_name].weight)


@torch.no_grad()
def _principal(layer: LoraLayer, adapter_name: str, *, method: str) -> None:
    """PiSSA (top singular triplets) or OLoRA (thin QR), moved out of the base weight."""
    if adapter_name not in layer.lora_A or layer.dense_base_weight().dim() != 2:
        raise ValueError(f"init_lora_weights={method!r} supports Linear and Conv1D layers only")
    r, scaling = layer.r[adapter_name], layer.scaling[adapter_name]
    weight = layer.dense_base_weight().float()
    if method == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        root = (s[:r] / scaling).sqrt()
        a = root[:, None] * vh[:r]
        b = u[:, :r] * root[None, :]
    else:
        q, rr = torch.linalg.qr(weight)
        a, b = rr[:r], q[:, :r]  # HF PEFT's OLoRA: unscaled factors, the scaling is taken out of W
    layer.lora_A[adapter_name].weight.data = a.contiguous()
    layer.lora_B[adapter_name].weight.data = b.contiguous()
    residual = weight - scaling * (b @ a)
    layer.set_base_weight(layer.from_dense(residual).to(layer.get_base_weight().dtype))
