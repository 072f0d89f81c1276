"""What every weight-adapting method shares: the layer protocol and the tuner that injects it.

A method is a config, a layer class and the names of its per-adapter parameters. An
:class:`AdapterLayer` wraps one base module, keeps several named adapters side by side, and
knows four things: how to add an adapter (``update_layer``), what it adds to the output
(``adapter_output``), and how to fold itself into the base weight and back (``merged_weight``
/ ``unmerged_weight``). Everything else — which adapters are active, disabling, per-example
adapter routing in mixed batches, merge bookkeeping, the base weight of quantized layers —
is written once here. :class:`BaseTuner` walks the model, swaps target modules for adapter
layers, wraps ``modules_to_save``, and marks what trains.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig
from ..targets import select_targets

BASE_ADAPTER = "__base__"  # name for "no adapter" in a mixed batch, as in HF PEFT


class AdapterLayer(nn.Module):
    """Base of every adapter layer; subclasses set ``adapter_layer_names`` and the math."""

    # Containers (ModuleDict / ParameterDict) keyed by adapter name holding trainable tensors.
    adapter_layer_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # Set by the tuner around one forward call for mixed batches: one adapter name per example.
        self.batch_adapter_names: Sequence[str] | None = None

    # ---- the method-specific part ---------------------------------------------------------
    def update_layer(self, adapter_name: str, config: PeftConfig, module_name: str) -> None:
        raise NotImplementedError

    def adapter_output(self, adapter_name: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapter ``adapter_name`` applied on top of ``result``."""
        raise NotImplementedError

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The additive change to the base weight, in the base weight's layout."""
        raise NotImplementedError

    def merged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight(adapter_name).to(weight.dtype)

    def unmerged_weight(self, adapter_name: str, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight(adapter_name).to(weight.dtype)

    # ---- the base weight (overridden by quantized layers) ---------------------------------
    def get_base_weight(self) -> torch.Tensor:
        return self.base_layer.weight.data

    def set_base_weight(self, weight: torch.Tensor) -> None:
        self.base_layer.weight.data = weight.to(self.base_layer.weight.dtype)

    # ---- nesting (mixed models wrap one method's layer in another's) --------------------
    def get_base_layer(self) -> nn.Module:
        """The original module under any number of adapter layers."""
        base = self.base_layer
        while isinstance(base, AdapterLayer):
            base = base.base_layer
        return base

    def __getattr__(self, name: str) -> Any:
        # Reads that miss fall through to the wrapped module (``weight``, ``bias``, ``in_features``,
        # ``padding_idx`` ...), so a layer wrapping another adapter layer sees the original module
        # and transformers code reading ``embed_tokens.weight`` keeps working on a wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    # ---- shared behaviour -----------------------------------------------------------------
    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def adapter_names(self) -> list[str]:
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for name in getattr(self, attr).keys():
                if name not in names:
                    names.append(name)
        return names

    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for name in container.keys():
                for param in _params(container[name]):
                    param.requires_grad_(trainable and name in names)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.merged_adapters:
            raise ValueError(f"adapter {adapter_name!r} is merged into {type(self).__name__}; unmerge it first")
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.delete_adapter_state(adapter_name)
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]

    def delete_adapter_state(self, adapter_name: str) -> None:
        """Drop per-adapter non-tensor state (scalings and the like)."""

    def merge(self, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.merged_adapters or name not in self.adapter_names:
                continue
            weight = self.get_base_weight()
            if safe_merge:
                new = self.merged_weight(name, weight.clone().float()).to(weight.dtype)
                if not torch.isfinite(new).all():
                    raise ValueError(f"merging adapter {name!r} into {type(self).__name__} gives NaN/inf weights")
            else:
                new = self.merged_weight(name, weight)
            self.set_base_weight(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.set_base_weight(self.unmerged_weight(name, self.get_base_weight()))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.batch_adapter_names is not None:
            if self.merged:
                raise ValueError("mixed-adapter batches need unmerged adapters; call unmerge_adapter() first")
            return self._mixed_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        return self._active_forward(x, *args, **kwargs)

    def _active_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The active (unmerged) adapters on one batch; methods that act differently override this."""
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.adapter_names:
                result = self.adapter_output(name, x, result)
        return result

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        names = list(self.batch_adapter_names or ())
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]}")
        result = self.base_layer(x, *args, **kwargs)
        pieces = []
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            # The tuner has checked the names; a layer an adapter does not target passes its rows through.
            if name == BASE_ADAPTER or name not in self.adapter_names:
                continue
            sub = self.adapter_output(name, x.index_select(0, index), result.index_select(0, index))
            pieces.append((index, sub))
        if not pieces:
            return result
        result = result.clone()
        for index, sub in pieces:
            result.index_copy_(0, index, sub.to(result.dtype))
        return result


class ModulesToSaveWrapper(nn.Module):
    """A whole module trained and saved per adapter (classification heads, say).

    Keeps the original and one trainable copy per adapter, with HF PEFT's attribute names so
    the state-dict keys (``...score.modules_to_save.default.weight``) match.
    """

    def __init__(self, module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False
        self.batch_adapter_names: Sequence[str] | None = None  # mixed batches, as in AdapterLayer
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        copy_.requires_grad_(True)
        self.modules_to_save[adapter_name] = copy_
        self.original_module.requires_grad_(False)
        self.active_adapter = adapter_name

    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        chosen = [n for n in names if n in self.modules_to_save]
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name in chosen)
        self.active_adapter = chosen[0] if chosen else None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.batch_adapter_names is not None and not self.disable_adapters:
            return self._mixed_forward(*args, **kwargs)
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each row through its adapter's copy (the original for "__base__" or an adapter without one)."""
        names = list(self.batch_adapter_names or ())
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]}")
        result = None
        for name in dict.fromkeys(names):
            index = torch.tensor([i for i, n in enumerate(names) if n == name], device=x.device)
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            sub = module(x.index_select(0, index), *args, **kwargs)
            if result is None:
                result = sub.new_empty((x.shape[0], *sub.shape[1:]))
            result.index_copy_(0, index, sub)
        return result


LayerFactory = Callable[[nn.Module, str, PeftConfig, str], "AdapterLayer | None"]


class BaseTuner(nn.Module):
    """Injects one method's adapter layers into a model and manages them.

    Subclasses provide ``layer_factories``: callables ``(target, adapter_name, config,
    module_name) -> AdapterLayer | None`` tried in order (quantized-layer support registers
    extra factories), and ``prefix``, the start of their trainable parameter names.
    """

    prefix: str = ""
    layer_factories: list[LayerFactory] = []

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapters: list[str] = [adapter_name]
        self.modules_to_save: set[str] = set()
        self.inject_adapter(adapter_name, config)

    # ---- injection ------------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; names in use: {list(self.peft_config)}")
        self.peft_config[adapter_name] = config
        try:
            self._inject(adapter_name, config)
        except Exception:
            self._discard_partial(adapter_name)  # a failed add_adapter must not leave half an adapter behind
            raise
        trainable = not any(self.peft_config[a].inference_mode for a in self.active_adapters if a in self.peft_config)
        self.set_adapter(self.active_adapters, trainable=trainable)
        self._mark_trainable()

    def _inject(self, adapter_name: str, config: PeftConfig) -> None:
        skip = set(self.modules_to_save) | set(config.modules_to_save or [])
        names = select_targets(
            self.model,
            getattr(config, "target_modules", None),
            exclude_modules=getattr(config, "exclude_modules", None),
            layers_to_transform=getattr(config, "layers_to_transform", None),
            layers_pattern=getattr(config, "layers_pattern", None),
            skip=skip,
        )
        for name in names:
            parent, attr, target = self._lookup(name)
            if isinstance(target, ModulesToSaveWrapper):
                raise ValueError(f"module {name!r} is in modules_to_save and cannot also be a target")
            if isinstance(target, AdapterLayer):
                target.update_layer(adapter_name, config, name)
                continue
            layer = self._create_layer(target, adapter_name, config, name)
            if layer is None:
                continue
            setattr(parent, attr, layer)
        self._wrap_modules_to_save(adapter_name, config.modules_to_save or [])

    def _discard_partial(self, adapter_name: str) -> None:
        """Undo a failed injection: drop the adapter and restore modules that only it wrapped."""
        self.peft_config.pop(adapter_name, None)
        for name, layer in list(self.named_adapter_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                parent, attr, _ = self._lookup(name)
                setattr(parent, attr, layer.base_layer)
        for name, wrapper in list(self.wrappers()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                parent, attr, _ = self._lookup(name)
                setattr(parent, attr, wrapper.original_module)
                self.modules_to_save.discard(name)

    def _create_layer(self, target: nn.Module, adapter_name: str, config: PeftConfig, name: str) -> AdapterLayer | None:
        for factory in self.layer_factories:
            layer = factory(target, adapter_name, config, name)
            if layer is not None:
                return layer
        raise ValueError(
            f"module {name!r} of type {type(target).__name__} is not supported by {type(self).__name__}; "
            f"target Linear, Conv1D, Embedding or Conv layers"
        )

    def _wrap_modules_to_save(self, adapter_name: str, patterns: Sequence[str]) -> None:
        if not patterns:
            return
        found = False
        for name in [n for n, _ in self.model.named_modules()]:
            if not name or not any(name == p or name.endswith("." + p) for p in patterns):
                continue
            if any(name.startswith(done + ".") for done in self.modules_to_save):
                continue
            found = True
            parent, attr, target = self._lookup(name)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            elif isinstance(target, AdapterLayer):
                raise ValueError(f"module {name!r} is an adapter target and cannot also be in modules_to_save")
            else:
                setattr(parent, attr, ModulesToSaveWrapper(target, adapter_name))
            self.modules_to_save.add(name)
        if not found:
            raise ValueError(f"modules_to_save={list(patterns)!r} matched no module of {type(self.model).__name__}")

    def _lookup(self, name: str) -> tuple[nn.Module, str, nn.Module]:
        parent_name, _, attr = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        return parent, attr, getattr(parent, attr)

    def _mark_trainable(self) -> None:
        """Freeze the base; adapter tensors of active adapters train, and biases per ``config.bias``."""
        attrs = self._adapter_attrs()  # once: a walk over every module per parameter is quadratic
        for name, param in self.model.named_parameters():
            if not self._is_adapter_param(name, attrs):
                param.requires_grad_(False)
        for name in self.active_adapters:
            config = self.peft_config.get(name)
            if config is None or config.inference_mode:
                continue
            bias = getattr(config, "bias", "none")
            if bias == "all":
                for pname, param in self.model.named_parameters():
                    if pname.endswith("bias"):
                        param.requires_grad_(True)
            elif bias.endswith("_only"):
                for layer in self.adapter_layers():
                    b = getattr(layer.base_layer, "bias", None)
                    if b is not None:
                        b.requires_grad_(True)

    def _is_adapter_param(self, name: str, attrs: set[str]) -> bool:
        return any(f".{attr}." in f".{name}" for attr in attrs) or ".modules_to_save." in name

    def _adapter_attrs(self) -> set[str]:
        return {attr for layer in self.adapter_layers() for attr in layer.adapter_layer_names}

    # ---- iteration --------------------------------------------------------------------------
    def adapter_layers(self) -> Iterator[AdapterLayer]:
        return (m for m in self.model.modules() if isinstance(m, AdapterLayer))

    def named_adapter_layers(self) -> Iterator[tuple[str, AdapterLayer]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, AdapterLayer))

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper))

    # ---- adapter management ---------------------------------------------------------------
    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} does not exist; adapters: {list(self.peft_config)}")
        for layer in self.adapter_layers():
            layer.set_adapter(names, trainable=trainable)
        for _, wrapper in self.wrappers():
            wrapper.set_adapter(names, trainable=trainable)
        self.active_adapters = names

    def set_adapter_trainable(self, adapter_name: str, trainable: bool = True) -> None:
        """Mark one adapter's tensors (and its modules_to_save copies) trainable, active or not."""
        for layer in self.adapter_layers():
            for attr in layer.adapter_layer_names:
                container = getattr(layer, attr)
                if adapter_name in container:
                    for param in _params(container[adapter_name]):
                        param.requires_grad_(trainable)
        for _, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter_name].requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name]
        for layer in self.adapter_layers():
            layer.delete_adapter(adapter_name)
        for _, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        for layer in self.adapter_layers():
            layer.disable_adapters = not enabled
        for _, wrapper in self.wrappers():
            wrapper.disable_adapters = not enabled

    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Route each example of the next forward through its own adapter (mixed batches)."""
        if adapter_names is None:
            yield
            return
        unknown = sorted({n for n in adapter_names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(f"adapter_names contains unknown adapters {unknown}; adapters: {list(self.peft_config)}")
        layers = [*self.adapter_layers(), *(w for _, w in self.wrappers())]
        for layer in layers:
            layer.batch_adapter_names = list(adapter_names)
        try:
            yield
        finally:
            for layer in layers:
                layer.batch_adapter_names = None

    def merge_adapter(self, adapter_names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        for layer in self.adapter_layers():
            layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge_adapter(self) -> None:
        for layer in self.adapter_layers():
            layer.unmerge()

    def merge_and_unload(self, *, safe_merge: bool = False, adapter_names: Sequence[str] | None = None,
                         progressbar: bool = False) -> nn.Module:
        """Fold the adapters into the base weights and return the plain base model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every adapter layer without merging and return the plain base model."""
        return self._unload(merge=False)

    def _unload(self, *, merge: bool, safe_merge: bool = False, adapter_names: Sequence[str] | None = None) -> nn.Module:
        for name, layer in list(self.named_adapter_layers()):
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            parent, attr, _ = self._lookup(name)
            setattr(parent, attr, layer.base_layer)
        for name, wrapper in list(self.wrappers()):
            parent, attr, _ = self._lookup(name)
            chosen = wrapper.active_adapter if merge and wrapper.active_adapter else None
            setattr(parent, attr, wrapper.modules_to_save[chosen] if chosen else wrapper.original_module)
        return self.model

    # ---- adapter tensors under HF PEFT's file keys ------------------------------------------
    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        from ..save_load import tuner_state_dict

        return tuner_state_dict(self, adapter_name, save_embedding_layers=save_embedding_layers)

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *, what: str = "adapter file") -> None:
        from ..save_load import load_into, optional_base_tensors

        expected = self.adapter_state_dict(adapter_name, save_embedding_layers=False)
        # Optional base tensors a file may carry: biases (bias="all"/"lora_only") and embeddings.
        load_into(expected, tensors, optional_base_tensors(self), what=what)

    # ---- the forward passes straight through -------------------------------------------------
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


def _params(container_entry: nn.Module | nn.Parameter) -> list[nn.Parameter]:
    if isinstance(container_entry, nn.Parameter):
        return [container_entry]
    return list(container_entry.parameters())
