"""The (IA)³ tuner: HF PEFT's per-architecture defaults, and weighted combination of vectors."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...targets import model_type
from ..base import BaseTuner, LayerFactory
from ..common import sync_fan_in_fan_out
from .config import IA3_FEEDFORWARD, IA3_TARGETS, IA3Config
from .layer import IA3Layer, create_ia3_layer


class IA3Model(BaseTuner):
    prefix = "ia3_"
    layer_factories: list[LayerFactory] = [create_ia3_layer]

    def inject_adapter(self, adapter_name: str, config: IA3Config) -> None:
        arch = model_type(self.model)
        for field, table in (("target_modules", IA3_TARGETS), ("feedforward_modules", IA3_FEEDFORWARD)):
            if getattr(config, field) is None:
                if arch not in table:
                    raise ValueError(
                        f"{field}=None but (IA)³ has no default for model_type={arch!r}; set {field} "
                        f"(defaults exist for: {', '.join(sorted(table))})"
                    )
                setattr(config, field, list(table[arch]))
        super().inject_adapter(adapter_name, config)

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        sync_fan_in_fan_out(config, target)
        return super()._create_layer(target, adapter_name, config, name)

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """A new adapter whose vectors are ``sum_i w_i l_i`` (targets and feed-forward sets united)."""
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} do not exist; adapters: {list(self.peft_config)}")
        if len(adapters) != len(weights):
            raise ValueError(f"got {len(adapters)} adapters but {len(weights)} weights")
        configs = [self.peft_config[a] for a in adapters]
        if len({type(c.target_modules) for c in configs}) > 1 or len({type(c.feedforward_modules) for c in configs}) > 1:
            raise ValueError("all adapters need the same kind (list or regex) of target_modules and feedforward_modules")

        def union(field: str):
            values = [getattr(c, field) for c in configs]
            if isinstance(values[0], str):
                return "|".join(f"({v})" for v in values)
            return sorted(set().union(*values))

        new = IA3Config(**{**{f: getattr(configs[0], f) for f in ("task_type", "base_model_name_or_path",
                                                                    "fan_in_fan_out", "init_ia3_weights")},
                           "target_modules": union("target_modules"),
                           "feedforward_modules": union("feedforward_modules"), "modules_to_save": None})
        self.inject_adapter(adapter_name, new)
        for layer in self.adapter_layers():
            if isinstance(layer, IA3Layer) and adapter_name in layer.ia3_l:
                combined = torch.zeros_like(layer.ia3_l[adapter_name])
                for adapter, weight in zip(adapters, weights):
                    if adapter in layer.ia3_l:
                        combined += weight * layer.ia3_l[adapter]
                layer.ia3_l[adapter_name].copy_(combined)
