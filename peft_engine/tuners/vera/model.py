"""The VeRA tuner: owns the shared random projections and saves them as HF PEFT does.

Per adapter, ``vera_A`` (r x max_in) and ``vera_B`` (max_out x r) are drawn once from a CPU
generator seeded with ``projection_prng_key`` (Kaiming-uniform, A first), sized for the
widest targeted layer. With ``save_projection`` they go into the adapter file under the
keys ``base_model.vera_A`` / ``base_model.vera_B``; otherwise loading regenerates them.
"""

from __future__ import annotations

import math
import warnings

import torch

from ...targets import select_targets
from ..base import BaseTuner
from ..common import in_out_features, is_linear_like, sync_fan_in_fan_out
from .config import VeraConfig
from .layer import Projections, create_vera_layer

KEY_A, KEY_B = "base_model.vera_A", "base_model.vera_B"


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt(2), fan-in = shape[1]) drawn from ``generator``."""
    bound = math.sqrt(6.0 / shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraModel(BaseTuner):
    prefix = "vera_lambda_"

    def inject_adapter(self, adapter_name: str, config: VeraConfig) -> None:
        if "vera_A" not in self._modules:
            self.vera_A = Projections(config.save_projection)
            self.vera_B = Projections(config.save_projection)
        for name, existing in self.peft_config.items():
            if existing.projection_prng_key != config.projection_prng_key:
                raise ValueError(f"projection_prng_key={config.projection_prng_key} differs from adapter {name!r}'s "
                                 f"{existing.projection_prng_key}; all VeRA adapters of a model share one key")
            if existing.save_projection != config.save_projection:
                raise ValueError(f"save_projection={config.save_projection} differs from adapter {name!r}'s; "
                                 "all VeRA adapters of a model must agree")
        out_dim, in_dim = self._largest_shape(config)
        generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
        device = next(self.model.parameters()).device
        self.vera_A[adapter_name] = kaiming_uniform((config.r, in_dim), generator).to(device)
        self.vera_B[adapter_name] = kaiming_uniform((out_dim, config.r), generator).to(device)
        try:
            super().inject_adapter(adapter_name, config)
        except Exception:
            self.vera_A.pop(adapter_name)
            self.vera_B.pop(adapter_name)
            raise

    def _largest_shape(self, config: VeraConfig) -> tuple[int, int]:
        names = select_targets(self.model, config.target_modules, layers_to_transform=config.layers_to_transform,
                               layers_pattern=config.layers_pattern, skip=config.modules_to_save or [])
        shapes = []
        for name in names:
            module = self.model.get_submodule(name)
            module = module.get_base_layer() if hasattr(module, "get_base_layer") else module
            if is_linear_like(module):
                fan_in, fan_out = in_out_features(module)
                shapes.append((fan_out, fan_in))
        if not shapes:
            raise ValueError(f"target_modules={config.target_modules!r} matched no Linear / Conv1D layer for VeRA")
        return max(s[0] for s in shapes), max(s[1] for s in shapes)

    def _create_layer(self, target, adapter_name, config, name):  # type: ignore[override]
        sync_fan_in_fan_out(config, target)
        layer = create_vera_layer(target, adapter_name, config, name, self.vera_A, self.vera_B)
        if layer is None:
            raise ValueError(f"module {name!r} of type {type(target).__name__} is not supported by VeRA; "
                             "allowed: Linear, Conv1D, bitsandbytes Linear4bit / Linear8bitLt")
        return layer

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.vera_A.pop(adapter_name)
        self.vera_B.pop(adapter_name)

    # ---- files: the projections ride along under their own keys -------------------------------
    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        out = super().adapter_state_dict(adapter_name, save_embedding_layers=save_embedding_layers)
        if self.peft_config[adapter_name].save_projection:
            out[KEY_A], out[KEY_B] = self.vera_A[adapter_name], self.vera_B[adapter_name]
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *, what: str = "adapter file") -> None:
        present = [k for k in (KEY_A, KEY_B) if k in tensors]
        if self.peft_config[adapter_name].save_projection:
            if len(present) < 2:
                raise ValueError(f"{what}: save_projection=True but {KEY_A} / {KEY_B} are missing from the file")
        elif present:
            warnings.warn(f"{what}: save_projection=False, ignoring the stored projections", stacklevel=2)
            tensors = {k: v for k, v in tensors.items() if k not in present}
        super().load_adapter_state_dict(tensors, adapter_name, what=what)
