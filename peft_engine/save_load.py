"""Adapter weights in HF PEFT's file layout, and nothing but safetensors.

Keys are the PeftModel's state-dict keys with the adapter name taken out
(``base_model.model.<module path>.lora_A.weight``); DoRA magnitudes are saved as
``...lora_magnitude_vector``, modules_to_save copies under the wrapped module's own path, as
HF PEFT writes them. Loading checks the file against the adapter it fills: a missing key, an
unexpected key or a shape mismatch is an error that names the key — never silently wrong weights.
"""

from __future__ import annotations

import json
import os
import re
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .targets import targetable_modules
from .tuners.base import BaseTuner

if TYPE_CHECKING:
    from .model import PeftModel

PREFIX = "base_model.model."
# HF PEFT's list: naming one of these in target_modules makes save_embedding_layers="auto" save them.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def tuner_state_dict(tuner: BaseTuner, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """File keys -> live tensors of one adapter of a weight-adapting tuner."""
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(tuner.peft_config)}")
    config = tuner.peft_config[adapter_name]
    out: dict[str, torch.Tensor] = {}
    for path, layer in tuner.named_adapter_layers():
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if adapter_name not in container:
                continue
            entry = container[adapter_name]
            if isinstance(entry, nn.Parameter):
                out[f"{PREFIX}{path}.{attr}"] = entry
            else:
                for pname, tensor in entry.state_dict(keep_vars=True).items():
                    out[_file_key(f"{PREFIX}{path}.{attr}.{pname}")] = tensor
        bias_mode = getattr(config, "bias", "none")
        base_bias = getattr(layer.base_layer, "bias", None)
        if bias_mode.endswith("_only") and base_bias is not None and adapter_name in layer.adapter_names:
            out[f"{PREFIX}{path}.base_layer.bias"] = base_bias
    out.update(_embedding_tensors(tuner, config, save_embedding_layers))
    if getattr(config, "bias", "none") == "all":
        for pname, param in tuner.model.named_parameters():
            if pname.endswith("bias") and ".modules_to_save." not in pname and ".original_module." not in pname:
                out[f"{PREFIX}{pname}"] = param
    for path, wrapper in tuner.wrappers():
        if adapter_name in wrapper.modules_to_save:
            for pname, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                out[f"{PREFIX}{path}.{pname}"] = tensor
    return out


def _embedding_tensors(tuner: BaseTuner, config, mode: bool | str) -> dict[str, torch.Tensor]:
    """The input/output embedding weights HF PEFT adds to a file, under its keys.

    ``"auto"`` means True when ``target_modules`` names an embedding layer or the vocabulary was
    resized against a local base config; True saves the embeddings' base weights (of the
    targeted, wrapped ones if any embedding is targeted, else of both, plain).
    """
    model = tuner.model
    targeted = _embedding_targeted(model, getattr(config, "target_modules", None))
    if mode == "auto":
        mode = targeted or _vocab_resized(model, getattr(config, "base_model_name_or_path", None))
    if not mode:
        return {}
    out: dict[str, torch.Tensor] = {}
    for name, module in _embedding_modules(model, targeted):
        for pname, tensor in module.state_dict(keep_vars=True).items():
            out[f"{PREFIX}{name}.{pname}"] = tensor
    return out


def _embedding_modules(model: nn.Module, targeted: bool) -> list[tuple[str, nn.Module]]:
    """(name, module) of the input and output embeddings; wrapped ones by their base layer."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        if layer is None:
            continue
        base = getattr(layer, "base_layer", None)
        valid = isinstance(base, (nn.Linear, nn.Embedding))
        if targeted and not valid:
            continue
        layers.append(base if base is not None else layer)
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(m)], m) for m in dict.fromkeys(layers) if id(m) in names]


def _embedding_targeted(model: nn.Module, targets) -> bool:
    if isinstance(targets, str):
        pattern = rf"(.*\.)?({'|'.join(EMBEDDING_LAYER_NAMES)})$"
        return any(re.fullmatch(targets, n) for n, _ in targetable_modules(model) if re.match(pattern, n))
    return bool(targets) and any(e in targets for e in EMBEDDING_LAYER_NAMES)


def _vocab_resized(model: nn.Module, base_path: str | None) -> bool:
    """True when a local base config's vocab_size differs from the model's (never asks the Hub)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    file = os.path.join(base_path, "config.json") if base_path else None
    if not vocab or not file or not os.path.isfile(file):
        return False
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    base_vocab = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return base_vocab is not None and base_vocab != vocab


def optional_base_tensors(tuner: BaseTuner) -> dict[str, torch.Tensor]:
    """Base tensors a file may carry besides the adapter: biases (bias="all"/"lora_only") and the
    input/output embeddings (save_embedding_layers), under their file keys."""
    extra = {f"{PREFIX}{n}": p for n, p in tuner.model.named_parameters()
             if n.endswith("bias") or n.endswith("base_layer.weight")}
    for targeted in (False, True):
        for name, module in _embedding_modules(tuner.model, targeted):
            extra.update({f"{PREFIX}{name}.{p}": t for p, t in module.state_dict(keep_vars=True).items()})
    return extra


def get_peft_model_state_dict(model: PeftModel, state_dict: dict | None = None, adapter_name: str = "default",
                              save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
    """HF PEFT's function of the same name: the tensors of one adapter under their file keys."""
    tensors = model.base_model.adapter_state_dict(adapter_name, save_embedding_layers=save_embedding_layers)
    return {k: v.detach() for k, v in tensors.items()}


def set_peft_model_state_dict(model: PeftModel, peft_model_state_dict: dict[str, torch.Tensor],
                              adapter_name: str = "default") -> None:
    """Copy file tensors into an existing adapter, refusing anything that does not fit exactly."""
    model.base_model.load_adapter_state_dict(peft_model_state_dict, adapter_name)


def load_into(expected: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor], extra: dict[str, torch.Tensor],
              *, what: str) -> None:
    """Copy ``loaded`` into ``expected`` (required keys) and ``extra`` (optional base tensors)."""
    loaded = {_normalise_key(k): v for k, v in loaded.items()}
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected) - set(extra))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_show(unexpected)}")
        raise ValueError(f"{what} does not fit this model's adapter: " + "; ".join(parts))
    for key, tensor in loaded.items():
        target = expected.get(key, extra.get(key))
        if tuple(target.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{what}: {key} has shape {tuple(tensor.shape)} but the model expects {tuple(target.shape)} "
                "(was it trained on a different base model or rank?)"
            )
    with torch.no_grad():
        for key, tensor in loaded.items():
            target = expected.get(key, extra.get(key))
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def _file_key(key: str) -> str:
    # DoRA magnitudes live as ``lora_magnitude_vector.<adapter>.weight``; HF PEFT files drop ".weight".
    if key.endswith(".lora_magnitude_vector.weight"):
        return key[: -len(".weight")]
    return key


def _normalise_key(key: str) -> str:
    # Older HF PEFT files store DoRA magnitudes with a trailing ".weight".
    if key.endswith(".lora_magnitude_vector.weight"):
        return key[: -len(".weight")]
    return key


def _show(keys: list[str], limit: int = 6) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def save_adapter_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write tensors as safetensors (contiguous copies; tied tensors are split)."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = f"{path}.tmp"
    save_file(data, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)  # a reader never sees a half-written file


def load_adapter_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no adapter weights at {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable safetensors adapter file ({exc})") from exc
