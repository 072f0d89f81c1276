"""Adapters of different methods on one model: ``get_peft_model(model, config, mixed=True)``.

HF PEFT's ``PeftMixedModel``, same semantics: a module targeted by a second method is wrapped
again, so layers nest (``LoHa(LoRA(Linear))``) and each adds its update on top of what the
inner ones produce — or, for OFT, rotates the input the inner ones see. A module targeted again
by a method already at the top of its stack gets another adapter in that layer. Several
adapters can be active at once (``set_adapter([...])``); the forward order is the nesting
order, not the order of names. Merging goes from the innermost layer outwards.

Each adapter is saved and loaded in its own method's HF PEFT layout (the nesting is invisible
in the keys), so an adapter trained here loads into a plain ``PeftModel`` and vice versa.
Bitsandbytes bases are refused, as in HF PEFT.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .config import CONFIG_NAME, WEIGHTS_NAME, PeftConfig, PeftType
from .save_load import PREFIX, load_adapter_file, load_into, save_adapter_file, tuner_state_dict
from .targets import select_targets
from .tuners.adalora import AdaLoraModel
from .tuners.adalora.layer import AdaLoraLayer
from .tuners.base import AdapterLayer, BaseTuner, ModulesToSaveWrapper
from .tuners.common import is_quantized
from .tuners.loha import LoHaModel
from .tuners.loha.layer import LoHaLayer
from .tuners.lokr import LoKrModel
from .tuners.lokr.layer import LoKrLayer
from .tuners.lora import LoraModel
from .tuners.lora.layer import LoraLayer
from .tuners.oft import OFTModel
from .tuners.oft.layer import OFTLayer

# peft_type -> (layer family, tuner whose factories build it)
MIXABLE: dict[str, tuple[type[AdapterLayer], type[BaseTuner]]] = {
    PeftType.LORA.value: (LoraLayer, LoraModel),
    PeftType.LOHA.value: (LoHaLayer, LoHaModel),
    PeftType.LOKR.value: (LoKrLayer, LoKrModel),
    PeftType.OFT.value: (OFTLayer, OFTModel),
    PeftType.ADALORA.value: (AdaLoraLayer, AdaLoraModel),
}


def check_mixable(config: PeftConfig) -> None:
    if config.peft_type not in MIXABLE:
        raise ValueError(f"peft_type={config.peft_type!r} cannot be mixed; allowed: {', '.join(MIXABLE)}")


def _chain(layer: nn.Module) -> list[AdapterLayer]:
    """The adapter layers from ``layer`` inwards."""
    chain = []
    while isinstance(layer, AdapterLayer):
        chain.append(layer)
        layer = layer.base_layer
    return chain


class MixedModel(BaseTuner):
    """The tuner under :class:`PeftMixedModel`: injection per method, nesting, unloading."""

    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        check_mixable(config)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; names in use: {list(self.peft_config)}")
        family, tuner = MIXABLE[config.peft_type]
        names = select_targets(
            self.model, getattr(config, "target_modules", None),
            exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None),
            skip=set(self.modules_to_save) | set(config.modules_to_save or []),
        )
        inside = {n for n, m in self.model.named_modules() if isinstance(m, AdapterLayer)}
        names = [n for n in names if not any(n.startswith(p + ".") for p in inside)]
        self.peft_config[adapter_name] = config
        try:
            for name in names:
                self._add_to(name, adapter_name, config, family, tuner)
        except Exception:
            self._discard_partial(adapter_name)  # unwraps the layers this adapter alone created
            raise
        self._wrap_modules_to_save(adapter_name, config.modules_to_save or [])
        trainable = not any(self.peft_config[a].inference_mode for a in self.active_adapters if a in self.peft_config)
        self.set_adapter(self.active_adapters, trainable=trainable)
        self._mark_trainable()

    def _add_to(self, name: str, adapter_name: str, config: PeftConfig, family: type[AdapterLayer],
                tuner: type[BaseTuner]) -> None:
        parent, attr, target = self._lookup(name)
        if isinstance(target, ModulesToSaveWrapper):
            raise ValueError(f"module {name!r} is in modules_to_save and cannot also be a target")
        if isinstance(target, family):
            target.update_layer(adapter_name, config, name)
            return
        base = target.get_base_layer() if isinstance(target, AdapterLayer) else target
        if is_quantized(base):
            raise ValueError(f"module {name!r} is bitsandbytes-quantized; mixed adapter types need an unquantized base")
        factories = list(tuner.layer_factories)
        if tuner is LoraModel:
            factories.reverse()  # LoRA tries its most specific kinds first
        for factory in factories:
            layer = factory(base, adapter_name, config, name)
            if layer is not None:
                break
        else:
            raise ValueError(f"module {name!r} of type {type(base).__name__} is not supported by {config.peft_type}")
        if isinstance(target, AdapterLayer):
            layer.base_layer = target  # nest: the new layer sees the inner layers' output
        setattr(parent, attr, layer)

    # ---- merging and unloading, innermost layer first ------------------------------------------
    def _stacks(self) -> list[tuple[str, list[AdapterLayer]]]:
        named = dict(self.named_adapter_layers())
        return [(n, _chain(m)) for n, m in named.items() if not any(n.startswith(p + ".") for p in named if p != n)]

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        for _, chain in self._stacks():
            for layer in reversed(chain):
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for _, chain in self._stacks():
            for layer in chain:
                layer.unmerge()

    def _unload(self, *, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        for name, chain in self._stacks():
            if merge:
                for layer in reversed(chain):
                    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            parent, attr, _ = self._lookup(name)
            setattr(parent, attr, chain[-1].base_layer)
        for name, wrapper in list(self.wrappers()):
            parent, attr, _ = self._lookup(name)
            chosen = wrapper.active_adapter if merge and wrapper.active_adapter else None
            setattr(parent, attr, wrapper.modules_to_save[chosen] if chosen else wrapper.original_module)
        return self.model

    # ---- files: each adapter under its own method's keys (no nesting in the names) -------------
    def _canonical(self, key: str, nested: dict[str, str]) -> str:
        for path in sorted(nested, key=len, reverse=True):
            head = f"{PREFIX}{path}."
            if key.startswith(head):
                return f"{PREFIX}{nested[path]}.{key[len(head):]}"
        return key

    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        nested = {}
        for top, chain in self._stacks():
            path = top
            for _ in chain[1:]:
                path += ".base_layer"
                nested[path] = top
        live = tuner_state_dict(self, adapter_name, save_embedding_layers=save_embedding_layers)
        return {self._canonical(k, nested): v for k, v in live.items()}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *, what: str = "adapter file") -> None:
        expected = self.adapter_state_dict(adapter_name, save_embedding_layers=False)
        extra = {f"{PREFIX}{n}": p for n, p in self.model.named_parameters() if n.endswith("bias")}
        load_into(expected, tensors, extra, what=what)


class PeftMixedModel(nn.Module):
    """A model carrying adapters of several methods (LoRA, LoHa, LoKr, OFT, AdaLoRA)."""

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        check_mixable(peft_config)
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        self.base_model = MixedModel(model, peft_config, adapter_name)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    # ---- adapters ---------------------------------------------------------------------------
    @property
    def peft_config(self) -> dict[str, PeftConfig]:
        return self.base_model.peft_config

    @property
    def active_adapter(self) -> str:
        return self.base_model.active_adapters[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self.base_model.active_adapters)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Add an adapter of any mixable method; it is not activated (use :meth:`set_adapter`)."""
        self.base_model.inject_adapter(adapter_name, peft_config)

    def set_adapter(self, adapter_name: str | Sequence[str]) -> None:
        """Activate one or several adapters; the unmerged forward applies all of them."""
        self.base_model.unmerge_adapter()
        self.base_model.set_adapter(adapter_name)

    def delete_adapter(self, adapter_name: str | Sequence[str]) -> None:
        for name in [adapter_name] if isinstance(adapter_name, str) else list(adapter_name):
            self.base_model.delete_adapter(name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        self.base_model.enable_adapter_layers(False)
        try:
            yield
        finally:
            self.base_model.enable_adapter_layers(True)

    def merge_and_unload(self, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        return self.base_model.merge_and_unload(safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        return self.base_model.unload()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for param in self.parameters():
            total += param.numel()
            trainable += param.numel() if param.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---- files ------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, selected_adapters: Sequence[str] | None = None,
                        **_: Any) -> None:
        """Each adapter in its method's HF PEFT layout: ``default`` in the folder, others in subfolders."""
        names = list(selected_adapters) if selected_adapters is not None else list(self.peft_config)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"selected_adapters {unknown} do not exist; adapters: {list(self.peft_config)}")
        for name in names:
            folder = os.fspath(save_directory) if name == "default" else os.path.join(save_directory, name)
            os.makedirs(folder, exist_ok=True)
            tensors = {k: v.detach() for k, v in self.base_model.adapter_state_dict(name).items()}
            save_adapter_file(tensors, os.path.join(folder, WEIGHTS_NAME))
            config = copy.copy(self.peft_config[name])
            config.inference_mode = True
            config.save_pretrained(folder)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False, **_: Any) -> None:
        """Add an adapter from a folder written by this engine or HF PEFT (any mixable method)."""
        config = PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        from .model import _loading_config

        self.add_adapter(adapter_name, _loading_config(config))
        self.peft_config[adapter_name] = config
        self._load_weights(model_id, adapter_name)
        self.base_model.set_adapter(self.active_adapters, trainable=is_trainable)

    def _load_weights(self, model_id: str | os.PathLike, adapter_name: str) -> None:
        path = os.path.join(model_id, WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} next to {CONFIG_NAME} in {model_id}")
        device = next(self.base_model.model.parameters()).device
        self.base_model.load_adapter_state_dict(load_adapter_file(path, device=device), adapter_name, what=path)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: PeftConfig | None = None, **_: Any) -> PeftMixedModel:
        from .model import _loading_config

        config = config or PeftConfig.from_pretrained(model_id)
        config.inference_mode = not is_trainable
        mixed = cls(model, _loading_config(config), adapter_name)
        mixed.peft_config[adapter_name] = config
        mixed._load_weights(model_id, adapter_name)
        mixed.base_model.set_adapter(adapter_name, trainable=is_trainable)
        return mixed
