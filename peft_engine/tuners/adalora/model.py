"""The AdaLoRA tuner: SVD-form layers, the orthogonality regulariser and rank re-allocation.

Training loop contract (what a loop must do besides the usual steps)::

    out = model(**batch)            # in train mode, out.loss already includes
    loss = out.loss                 #   orth_reg_weight * mean ||A A^T - I||_F, ||B^T B - I||_F
    loss.backward()
    optimizer.step()
    model.base_model.update_and_allocate(global_step)   # needs the gradients: before zero_grad
    optimizer.zero_grad()

A loop that computes its own loss adds ``model.base_model.orthogonal_regularization()``.
Unlike HF PEFT, the regulariser is added only in training mode, so evaluation losses stay
comparable with other methods. Saving prunes the triplets masked out by ``rank_pattern``;
loading a pruned file shrinks the layers to match first, exactly as HF PEFT does.
"""

from __future__ import annotations

from typing import Any

import torch

from ...save_load import PREFIX
from ...targets import model_type
from ..base import BaseTuner, LayerFactory
from ..common import sync_fan_in_fan_out
from .allocator import RankAllocator
from .config import ADALORA_TARGETS, AdaLoraConfig
from .layer import AdaLoraLayer, create_adalora_layer


class AdaLoraModel(BaseTuner):
    prefix = "lora_"
    layer_factories: list[LayerFactory] = [create_adalora_layer]

    def __init__(self, model: torch.nn.Module, config: AdaLoraConfig, adapter_name: str = "default") -> None:
        super().__init__(model, config, adapter_name)
        self.trainable_adapter_name: str | None = None
        self.rankallocator: RankAllocator | None = None
        if not config.inference_mode:
            self.trainable_adapter_name = adapter_name
            self.rankallocator = RankAllocator(self.model, config, adapter_name)

    def inject_adapter(self, adapter_name: str, config: AdaLoraConfig) -> None:
        trainable = [n for n, c in self.peft_config.items() if not c.inference_mode]
        if not config.inference_mode and trainable:
            raise ValueError(f"AdaLoRA trains one adapter at a time and {trainable[0]!r} is trainable; add "
                             f"{adapter_name!r} with inference_mode=True")
        if config.target_modules is None:
            arch = model_type(self.model)
            if arch not in ADALORA_TARGETS:
                raise ValueError(f"target_modules=None but AdaLoRA has no default for model_type={arch!r}; set "
                                 f"target_modules (defaults exist for: {', '.join(sorted(ADALORA_TARGETS))})")
            config.target_modules = list(ADALORA_TARGETS[arch])
        super().inject_adapter(adapter_name, config)

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        sync_fan_in_fan_out(config, target)
        return super()._create_layer(target, adapter_name, config, name)

    def _layers_with(self, adapter_name: str) -> list[tuple[str, AdaLoraLayer]]:
        return [(n, m) for n, m in self.named_adapter_layers() if isinstance(m, AdaLoraLayer) and adapter_name in m.r]

    # ---- training ---------------------------------------------------------------------------
    def orthogonal_regularization(self) -> torch.Tensor:
        """``orth_reg_weight`` x the mean over A and B matrices of ||A A^T - I||_F / ||B^T B - I||_F."""
        name = self.trainable_adapter_name
        if name is None:
            raise ValueError("no trainable AdaLoRA adapter (all were added with inference_mode=True)")
        terms = []
        for _, layer in self._layers_with(name):
            for cov in (layer.lora_A[name] @ layer.lora_A[name].T, layer.lora_B[name].T @ layer.lora_B[name]):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        weight = self.peft_config[name].orth_reg_weight
        if not terms:
            return torch.zeros((), device=next(self.model.parameters()).device)
        return weight * torch.stack(terms).mean()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        loss = getattr(outputs, "loss", None)
        if self.training and self.trainable_adapter_name is not None and isinstance(loss, torch.Tensor):
            outputs.loss = loss + self.orthogonal_regularization()
        return outputs

    def update_and_allocate(self, global_step: int) -> None:
        """Update importance scores and re-mask ranks; call after ``backward()``, before ``zero_grad()``."""
        if self.rankallocator is None or self.trainable_adapter_name is None:
            raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter")
        config = self.peft_config[self.trainable_adapter_name]
        last_budget_step = config.total_step - config.tfinal
        if global_step < last_budget_step:
            _, pattern = self.rankallocator.update_and_allocate(self.model, global_step)
            if pattern:
                config.rank_pattern = pattern
        elif global_step == last_budget_step:
            _, pattern = self.rankallocator.update_and_allocate(self.model, global_step, force_mask=True)
            config.rank_pattern = pattern
            self.rankallocator.reset_ipt()
        elif config.rank_pattern:
            self.rankallocator.mask_using_rank_pattern(self.model, config.rank_pattern)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("AdaLoraModel does not support add_weighted_adapter; use LoRA")

    # ---- files: only the surviving triplets are saved -------------------------------------------
    def _pattern_by_module(self, adapter_name: str) -> dict[str, list[bool]]:
        """rank_pattern with adapter names stripped (as saved), keyed by module path."""
        config = self.peft_config[adapter_name]
        pattern = {k.replace(f".{adapter_name}", ""): v for k, v in (config.rank_pattern or {}).items()}
        return {key.rsplit(".lora_E", 1)[0]: mask for key, mask in pattern.items()}

    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(adapter_name, save_embedding_layers=save_embedding_layers)
        config = self.peft_config[adapter_name]
        if not config.rank_pattern:
            return out
        config.rank_pattern = {k.replace(f".{adapter_name}", ""): v for k, v in config.rank_pattern.items()}
        for module, mask in self._pattern_by_module(adapter_name).items():
            keep = torch.tensor(mask, dtype=torch.bool)
            for attr in ("lora_A", "lora_E", "lora_B"):
                key = f"{PREFIX}{module}.{attr}"
                if key not in out:
                    continue
                tensor = out[key]
                rank = tensor.shape[1] if attr == "lora_B" else tensor.shape[0]
                if int(keep.sum()) != rank:
                    out[key] = tensor[:, keep.to(tensor.device)] if attr == "lora_B" else tensor[keep.to(tensor.device)]
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *, what: str = "adapter file") -> None:
        if self.peft_config[adapter_name].rank_pattern:
            for module, mask in self._pattern_by_module(adapter_name).items():
                layer = self.model.get_submodule(module)
                if not isinstance(layer, AdaLoraLayer):
                    raise ValueError(f"{what}: rank_pattern names {module!r}, which is not an AdaLoRA layer")
                if layer.r[adapter_name] != sum(mask):
                    layer.keep_ranks(adapter_name, torch.tensor(mask, dtype=torch.bool))
        super().load_adapter_state_dict(tensors, adapter_name, what=what)
