"""Adaption prompts (LLaMA-Adapter): gated prompt tokens inside the top attention layers.

Each adapted attention module keeps, per adapter, ``adaption_prompt`` (1, adapter_len, hidden)
and a scalar ``adaption_gate`` that starts at zero. The layer's queries attend, in a separate
softmax, to the prompt's keys and values (projected by the layer's own k/v projections, no
rotary embedding); the result, scaled by the gate, is added to the attention output — so a new
adapter leaves the model exactly as it was and training opens the gate. The formulas, the
parameter names and the file keys (``base_model.model.<attention path>.adaption_prompt``) are
HF PEFT's, which supports the same model types: Llama, Mistral and GPT-2.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig
from .config import AdaptionPromptConfig

FILE_PREFIX = "base_model.model."
# model_type -> (attention submodule name, how to compute its queries and adapter keys/values)
MODEL_TYPES: dict[str, tuple[str, str]] = {
    "llama": ("self_attn", "llama"),
    "mistral": ("self_attn", "llama"),
    "gpt2": ("attn", "gpt2"),
}


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class AdaptedAttention(nn.Module):
    """Wraps one attention module (kept as ``model``, HF PEFT's name) and adds gated adaption prompts."""

    def __init__(self, attention: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = attention
        self.kind = kind
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add(self, adapter_name: str, adapter_len: int) -> None:
        attention = self.model
        probe = attention.q_proj.weight if self.kind == "llama" else attention.c_proj.weight
        # Quantized layers store packed integers: keep the adapter in float32 then.
        dtype = torch.float32 if probe.dtype in (torch.int8, torch.uint8) else probe.dtype
        device = next(attention.parameters()).device
        hidden = attention.config.hidden_size
        self.adaption_prompt[adapter_name] = nn.Parameter(
            torch.empty(1, adapter_len, hidden, device=device, dtype=dtype).normal_())
        self.adaption_gate[adapter_name] = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def remove(self, adapter_name: str) -> None:
        for container in (self.adaption_prompt, self.adaption_gate):
            if adapter_name in container:
                del container[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self.model(*args, **kwargs)
        name = self.active_adapter
        if self.disabled or name is None or name not in self.adaption_prompt:
            return outputs
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        attn_output = outputs[0]
        if self.kind == "llama":
            query, keys, values = self._llama_states(name, hidden, kwargs)
        else:
            query, keys, values = self._gpt2_states(name, hidden, attn_output.shape[-1])
        dtype = query.dtype
        head_dim = query.shape[-1]
        scores = torch.matmul(query, keys.transpose(2, 3).to(dtype)) / math.sqrt(head_dim)
        scores = self.adaption_gate[name] * nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
        batch, length = hidden.shape[0], hidden.shape[1]
        extra = torch.matmul(scores, values).transpose(1, 2).reshape(batch, length, -1)
        if self.kind == "llama":
            extra = self.model.o_proj(extra)
        return ((attn_output + extra).to(dtype), *outputs[1:])

    def _llama_states(self, name: str, hidden: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, ...]:
        attention, config = self.model, self.model.config
        head_dim = attention.head_dim
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        prompt = self.adaption_prompt[name]
        batch, length = hidden.shape[0], hidden.shape[1]

        def per_head(x: torch.Tensor) -> torch.Tensor:
            x = x.view(1, prompt.shape[1], kv_heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)
            return torch.repeat_interleave(x, heads // kv_heads, dim=1)

        keys, values = per_head(attention.k_proj(prompt)), per_head(attention.v_proj(prompt))
        query = attention.q_proj(hidden).view(batch, length, heads, head_dim).transpose(1, 2)
        rotary = kwargs.get("position_embeddings")
        if rotary is None:
            raise ValueError(f"{type(attention).__name__} was called without position_embeddings; adaption "
                             "prompts need the rotary (cos, sin) the decoder layer passes (transformers >= 4.48)")
        cos, sin = rotary[0].unsqueeze(1), rotary[1].unsqueeze(1)
        return query * cos + _rotate_half(query) * sin, keys, values

    def _gpt2_states(self, name: str, hidden: torch.Tensor, width: int) -> tuple[torch.Tensor, ...]:
        attention = self.model
        head_dim = attention.head_dim
        heads = attention.config.num_attention_heads
        prompt = self.adaption_prompt[name]
        batch = hidden.shape[0]
        _, key, value = attention.c_attn(prompt).split(width, dim=2)

        def per_head(x: torch.Tensor) -> torch.Tensor:
            return x.view(1, prompt.shape[1], heads, head_dim).expand(batch, -1, -1, -1).transpose(1, 2)

        query = attention.c_attn(hidden).split(attention.split_size, dim=2)[0]
        query = query.view(*query.shape[:-1], -1, head_dim).transpose(1, 2)
        return query, per_head(key), per_head(value)


class AdaptionPromptModel(nn.Module):
    """The tuner: wraps the top ``adapter_layers`` attention modules; one adapter active at a time."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, AdaptionPromptConfig] = {}
        self.active_adapters: list[str] = [adapter_name]
        model.requires_grad_(False)
        self.inject_adapter(adapter_name, config)

    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; names in use: {list(self.peft_config)}")
        if not isinstance(config, AdaptionPromptConfig):
            raise ValueError(f"{type(config).__name__} is not an AdaptionPromptConfig")
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={model_type!r} is not supported by adaption prompts; allowed: "
                             f"{', '.join(map(repr, MODEL_TYPES))}")
        target, kind = MODEL_TYPES[model_type]
        if config.target_modules is None:
            config.target_modules = target
        paths = [n for n, _ in self.model.named_modules() if n.endswith("." + config.target_modules)]
        if len(paths) < config.adapter_layers:
            raise ValueError(f"adapter_layers={config.adapter_layers} is not allowed; allowed: at most "
                             f"{len(paths)} (the model has {len(paths)} '{config.target_modules}' modules)")
        for path in paths[-config.adapter_layers:]:
            parent_name, _, attr = path.rpartition(".")
            parent = self.model.get_submodule(parent_name)
            module = getattr(parent, attr)
            if not isinstance(module, AdaptedAttention):
                module = AdaptedAttention(module, kind)
                setattr(parent, attr, module)
            module.add(adapter_name, config.adapter_len)
        self.peft_config[adapter_name] = config
        active = [a for a in self.active_adapters if a in self.peft_config] or [adapter_name]
        self.set_adapter(active, trainable=not any(self.peft_config[a].inference_mode for a in active))

    def _adapted(self) -> Iterator[tuple[str, AdaptedAttention]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, AdaptedAttention))

    def named_adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())  # no BaseTuner-style adapter layers

    def wrappers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())

    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} does not exist; adapters: {list(self.peft_config)}")
        if len(names) != 1:
            raise ValueError(f"adapter_names={names!r} is not allowed; adaption prompts use one active adapter "
                             "at a time: pass a single name")
        for _, module in self._adapted():
            for container in (module.adaption_prompt, module.adaption_gate):
                for name, param in container.items():
                    param.requires_grad_(trainable and name == names[0])
            module.active_adapter = names[0]
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for path, module in list(self._adapted()):
            module.remove(adapter_name)
            if not len(module.adaption_prompt):
                self._restore(path, module)
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def _restore(self, path: str, module: AdaptedAttention) -> None:
        parent_name, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent_name), attr, module.model)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for _, module in self._adapted():
            module.disabled = not enabled

    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        if adapter_names is None:
            yield
            return
        chosen = set(adapter_names)
        if len(chosen) != 1 or next(iter(chosen)) not in self.peft_config:
            raise NotImplementedError(
                f"adapter_names={sorted(chosen)!r}: adaption prompts cannot mix adapters in one batch; "
                f"allowed: one adapter of {list(self.peft_config)} for every example")
        modules = [(m, m.active_adapter) for _, m in self._adapted()]
        for module, _ in modules:
            module.active_adapter = next(iter(chosen))
        try:
            yield
        finally:
            for module, name in modules:
                module.active_adapter = name

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("adaption prompts add attention to extra tokens and cannot be merged into the "
                                  "base weights; use unload() to get the bare model back")

    def unload(self) -> nn.Module:
        for path, module in list(self._adapted()):
            self._restore(path, module)
        return self.model

    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        out = {}
        for path, module in self._adapted():
            if adapter_name in module.adaption_prompt:
                out[f"{FILE_PREFIX}{path}.adaption_prompt"] = module.adaption_prompt[adapter_name]
                out[f"{FILE_PREFIX}{path}.adaption_gate"] = module.adaption_gate[adapter_name]
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *,
                                what: str = "adapter file") -> None:
        from ...save_load import load_into

        load_into(self.adapter_state_dict(adapter_name), tensors, {}, what=what)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)
