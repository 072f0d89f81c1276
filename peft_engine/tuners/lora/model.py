"""The LoRA tuner: base-tuner behaviour plus LoRA's weighted combination of adapters."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..base import BaseTuner, LayerFactory
from .config import LoraConfig
from .layer import LoraLayer, create_lora_layer


class LoraModel(BaseTuner):
    prefix = "lora_"
    # Quantized layer kinds append their factory here (see peft_engine.quantization).
    layer_factories: list[LayerFactory] = [create_lora_layer]

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        for factory in reversed(self.layer_factories):  # most specific (quantized) kinds first
            layer = factory(target, adapter_name, config, name)
            if layer is not None:
                return layer
        raise ValueError(
            f"module {name!r} of type {type(target).__name__} is not supported by LoRA; "
            "allowed: Linear, Conv1D, Embedding, Conv1d, Conv2d, bitsandbytes Linear4bit / Linear8bitLt"
        )

    @torch.no_grad()
    def add_weighted_adapter(
        self,
        adapters: Sequence[str],
        weights: Sequence[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
    ) -> None:
        """A new adapter equal to a weighted combination of existing ones.

        ``linear``: same ranks, ``A = sum sqrt(w_i) s_i A_i``, ``B = sum sqrt(w_i) B_i`` (cross
        terms included, as HF PEFT does). ``cat``: ranks add; ``B A = sum w_i s_i B_i A_i`` exactly.
        ``svd``: the exact weighted delta truncated to ``svd_rank`` by SVD.
        """
        if combination_type not in ("linear", "cat", "svd"):
            raise ValueError(f"combination_type={combination_type!r} is not allowed; allowed: 'linear', 'cat', 'svd'")
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} do not exist; adapters: {list(self.peft_config)}")
        if len(adapters) != len(weights):
            raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
        configs = [self.peft_config[a] for a in adapters]
        if any(c.use_dora for c in configs):
            raise ValueError("add_weighted_adapter does not combine DoRA adapters (their magnitudes do not add)")
        ranks = [c.r for c in configs]
        if combination_type == "linear" and len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' needs equal ranks, got {ranks}; use 'cat' or 'svd'")
        new_rank = {"linear": ranks[0], "cat": sum(ranks), "svd": svd_rank or max(ranks)}[combination_type]
        base = configs[0]
        targets = sorted({name for name, layer in self.named_adapter_layers() if any(a in layer.r for a in adapters)})
        new_config = LoraConfig(
            r=new_rank, lora_alpha=new_rank, target_modules=targets, init_lora_weights=False,
            task_type=base.task_type, modules_to_save=None, base_model_name_or_path=base.base_model_name_or_path,
        )
        self.inject_adapter(adapter_name, new_config)
        for _, layer in self.named_adapter_layers():
            if adapter_name in layer.r:
                _combine(layer, adapters, weights, adapter_name, combination_type, new_rank)


def _combine(layer: LoraLayer, adapters, weights, target: str, kind: str, rank: int) -> None:
    present = [(a, w) for a, w in zip(adapters, weights) if a in layer.r]
    if target in layer.lora_A:
        new_a, new_b = layer.lora_A[target].weight, layer.lora_B[target].weight
    else:
        new_a, new_b = layer.lora_embedding_A[target], layer.lora_embedding_B[target]
    if not present:
        new_a.zero_()
        new_b.zero_()
        return
    if kind == "svd":
        delta = sum(w * layer.dense_delta(a).flatten(1) for a, w in present)
        u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
        b, a = u[:, :rank] * s[:rank], vh[:rank]
    elif kind == "cat":
        a = torch.cat([layer.factors(n)[0] for n, _ in present], dim=0)
        b = torch.cat([layer.factors(n)[1] * w * layer.scaling[n] for n, w in present], dim=1)
    else:
        if any(w < 0 for _, w in present):
            raise ValueError("combination_type='linear' needs non-negative weights")
        a = sum(w**0.5 * layer.scaling[n] * layer.factors(n)[0] for n, w in present)
        b = sum(w**0.5 * layer.factors(n)[1] for n, w in present)
    # The new adapter's own scaling is alpha / r = 1, so its delta is exactly B @ A.
    new_a.data = a.reshape(new_a.shape).to(new_a.dtype).contiguous()
    new_b.data = b.reshape(new_b.shape).to(new_b.dtype).contiguous()
