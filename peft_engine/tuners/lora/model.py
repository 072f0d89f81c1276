"""The LoRA tuner: base-tuner behaviour plus LoRA's weighted combination of adapters."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ...config import PeftConfig
from ...quantization import create_quantized_lora_layer
from ..base import BaseTuner, LayerFactory
from .layer import Linear, LoraLayer, create_lora_layer
from .shared_input import link_shared_inputs


class LoraModel(BaseTuner):
    prefix = "lora_"
    # Tried last to first: bitsandbytes layers (peft_engine.quantization), then the plain kinds.
    layer_factories: list[LayerFactory] = [create_lora_layer, create_quantized_lora_layer]

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        for factory in reversed(self.layer_factories):  # most specific (quantized) kinds first
            layer = factory(target, adapter_name, config, name)
            if layer is not None:
                return layer
        raise ValueError(
            f"module {name!r} of type {type(target).__name__} is not supported by LoRA; "
            "allowed: Linear, Conv1D, Embedding, Conv1d, Conv2d, bitsandbytes Linear4bit / Linear8bitLt"
        )

    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        super().inject_adapter(adapter_name, config)
        link_shared_inputs(self.model, Linear)

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """A new adapter equal to a weighted combination of existing ones, as HF PEFT computes it.

        ``linear``: same ranks, ``A = sum sign(w_i) sqrt(|w_i s_i|) A_i``, ``B = sum sqrt(|w_i s_i|) B_i``
        (cross terms included: an approximation). ``cat``: ranks add, ``B A = sum w_i s_i B_i A_i``
        exactly (zero-padded where a layer lacks an adapter). ``svd``: the exact weighted delta
        truncated to ``svd_rank`` (default: the largest rank) by SVD. One adapter is always ``linear``.
        The new adapter's scaling is 1 (alpha = r, no rsLoRA), so its delta is exactly ``B @ A``.
        """
        if combination_type not in ("linear", "cat", "svd"):
            raise ValueError(f"combination_type={combination_type!r} is not allowed; allowed: 'linear', 'cat', 'svd'")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} do not exist; adapters: {list(self.peft_config)}")
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights; give one weight per adapter")
        configs = [self.peft_config[a] for a in adapters]
        if any(c.use_dora for c in configs):
            raise ValueError("add_weighted_adapter does not combine DoRA adapters (their magnitudes do not add)")
        shared = [n for n, w in self.wrappers() if sum(a in w.modules_to_save for a in adapters) > 1]
        if shared:
            raise ValueError(f"adapters {list(adapters)} each train their own copy of {shared} (modules_to_save); cannot combine")
        combination_type = "linear" if len(adapters) == 1 else combination_type
        ranks = [max(c.r, *c.rank_pattern.values()) if c.rank_pattern else c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks, got {ranks}; use 'cat' or 'svd'")
        new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
        targets = sorted({name for name, layer in self.named_adapter_layers() if any(a in layer.r for a in adapters)})
        new_config = dataclasses.replace(
            configs[0], r=new_rank, lora_alpha=new_rank, target_modules=targets, rank_pattern={}, alpha_pattern={},
            use_rslora=False, init_lora_weights=True, modules_to_save=None, exclude_modules=None,
            layers_to_transform=None, layers_pattern=None,
        )
        self.inject_adapter(adapter_name, new_config)
        for _, layer in self.named_adapter_layers():
            if adapter_name in layer.r:
                _combine(layer, adapters, weights, adapter_name, combination_type, new_rank)


def _native_factors(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) in their stored shapes: A's rank is dim 0, B's rank is dim 1."""
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _combine(layer: LoraLayer, adapters, weights, target: str, kind: str, rank: int) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    new_a, new_b = _native_factors(layer, target)
    new_a.zero_()
    new_b.zero_()
    if not present:
        return
    if kind == "svd":
        delta = sum(w * layer.dense_delta(a).float().flatten(1) for a, w in present)
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        b, a = u[:, :rank] * s[:rank], vh[:rank]
        b = b.reshape(b.shape[0], b.shape[1], *new_b.shape[2:])
        a = a.reshape(a.shape[0], *new_a.shape[1:])
    elif kind == "cat":
        a = torch.cat([_native_factors(layer, n)[0] * w * layer.scaling[n] for n, w in present], dim=0)
        b = torch.cat([_native_factors(layer, n)[1] for n, _ in present], dim=1)
    else:
        roots = [(abs(w * layer.scaling[n]) ** 0.5, 1.0 if w * layer.scaling[n] >= 0 else -1.0, n) for n, w in present]
        a = sum(sign * root * _native_factors(layer, n)[0] for root, sign, n in roots)
        b = sum(root * _native_factors(layer, n)[1] for root, _, n in roots)
    # Zero-padded: a layer may hold fewer (or lower-rank) adapters than the new rank counts.
    new_a[: a.shape[0]] = a.to(new_a.dtype)
    new_b[:, : b.shape[1]] = b.to(new_b.dtype)
