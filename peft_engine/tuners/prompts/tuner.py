"""The tuner of the prompt-learning methods: prompt tuning, prefix tuning, P-tuning, multitask.

These methods change no module of the base model: they keep a prompt encoder per adapter and
extend each forward's inputs (virtual token embeddings, or a key/value prefix cache) — see
:mod:`.forward`. This class gives :class:`~peft_engine.model.PeftModel` the same surface as
:class:`~peft_engine.tuners.base.BaseTuner` (adapters, trainability, files), so the wrappers
and the file code need no method-specific branches. One adapter is active at a time.

Files use HF PEFT's layout: ``prompt_embeddings`` holds the encoder's output (for P-tuning and
projected prefixes the trained reparameterisation itself is not saved, exactly as in HF PEFT),
multitask adds ``prefix_task_cols`` / ``prefix_task_rows``, and trained heads
(``modules_to_save``) sit under ``base_model.<module path>``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ...config import PeftConfig, PeftType
from ..base import ModulesToSaveWrapper
from . import forward as fwd
from .config import PROMPT_TASKS, PrefixTuningConfig, PromptLearningConfig
from .multitask import MultitaskPromptEmbedding
from .p_tuning import PromptEncoder
from .prefix import PrefixEncoder, prefix_cache
from .prompt_tuning import PromptEmbedding

FILE_PREFIX = "base_model."  # HF PEFT keys prompt-learning heads by the bare model's module path


class PromptLearningModel(nn.Module):
    """``model`` plus one prompt encoder per adapter (``prompt_encoder[name]``)."""

    def __init__(self, model: nn.Module, config: PeftConfig, adapter_name: str = "default") -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.prompt_encoder = nn.ModuleDict()
        self.active_adapters: list[str] = [adapter_name]
        self.modules_to_save: set[str] = set()
        self._enabled = True
        model.requires_grad_(False)
        self.inject_adapter(adapter_name, config)

    # ---- adapters ---------------------------------------------------------------------------
    def inject_adapter(self, adapter_name: str, config: PeftConfig) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; names in use: {list(self.peft_config)}")
        if not isinstance(config, PromptLearningConfig):
            raise ValueError(f"{type(config).__name__} is not a prompt-learning config")
        if config.task_type not in PROMPT_TASKS:
            raise ValueError(f"task_type={config.task_type!r} is not allowed for {config.peft_type}; "
                             f"allowed: {', '.join(map(repr, PROMPT_TASKS))}")
        fill_model_shapes(config, self.model)
        if isinstance(config, PrefixTuningConfig) and any(
                getattr(m, "gradient_checkpointing", False) for m in self.model.modules()):
            raise ValueError("prefix tuning does not work with gradient checkpointing (its prefix lives in the "
                             "key/value cache, which checkpointing disables); turn gradient checkpointing off")
        embeddings = self.word_embeddings
        encoder = build_encoder(config, embeddings)
        self.prompt_encoder[adapter_name] = encoder.to(embeddings.weight.device)
        self.peft_config[adapter_name] = config
        try:
            self._wrap_modules_to_save(adapter_name, config.modules_to_save or [])
        except Exception:
            del self.peft_config[adapter_name], self.prompt_encoder[adapter_name]
            raise
        active = [a for a in self.active_adapters if a in self.peft_config]
        trainable = not any(self.peft_config[a].inference_mode for a in active)
        self.set_adapter(active or [adapter_name], trainable=trainable)

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
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            target = getattr(parent, attr)
            if isinstance(target, ModulesToSaveWrapper):
                target.update(adapter_name)
            else:
                setattr(parent, attr, ModulesToSaveWrapper(target, adapter_name))
            self.modules_to_save.add(name)
        if not found:
            raise ValueError(f"modules_to_save={list(patterns)!r} matched no module of {type(self.model).__name__}")

    def wrappers(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSaveWrapper))

    def named_adapter_layers(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(())  # no module of the base model is replaced

    def adapter_layers(self) -> Iterator[nn.Module]:
        return iter(())

    def set_adapter(self, adapter_names: str | Sequence[str], *, trainable: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"adapter {unknown[0]!r} does not exist; adapters: {list(self.peft_config)}")
        if len(names) != 1:
            raise ValueError(f"adapter_names={names!r} is not allowed; prompt-learning methods use one active "
                             "adapter at a time: pass a single name")
        for name, encoder in self.prompt_encoder.items():
            encoder.requires_grad_(trainable and name in names)
        for _, wrapper in self.wrappers():
            wrapper.set_adapter(names, trainable=trainable)
        self.active_adapters = names

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        del self.peft_config[adapter_name], self.prompt_encoder[adapter_name]
        for _, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
        remaining = [a for a in self.active_adapters if a != adapter_name] or list(self.peft_config)[:1]
        if remaining:
            self.set_adapter(remaining)
        else:
            self.active_adapters = []

    def enable_adapter_layers(self, enabled: bool = True) -> None:
        self._enabled = enabled
        for _, wrapper in self.wrappers():
            wrapper.disable_adapters = not enabled

    @contextlib.contextmanager
    def batch_adapters(self, adapter_names: Sequence[str] | None) -> Iterator[None]:
        """Only a batch whose examples all name the same adapter is allowed (it runs that adapter)."""
        if adapter_names is None:
            yield
            return
        chosen = set(adapter_names)
        if len(chosen) != 1 or next(iter(chosen)) not in self.peft_config:
            raise NotImplementedError(
                f"adapter_names={sorted(chosen)!r}: prompt-learning methods cannot mix adapters in one batch; "
                f"allowed: one adapter of {list(self.peft_config)} for every example")
        previous = self.active_adapters
        heads = [(w, w.active_adapter) for _, w in self.wrappers()]
        self.active_adapters = list(chosen)
        for wrapper, _ in heads:
            wrapper.active_adapter = next(iter(chosen)) if next(iter(chosen)) in wrapper.modules_to_save else None
        try:
            yield
        finally:
            self.active_adapters = previous
            for wrapper, name in heads:
                wrapper.active_adapter = name

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise NotImplementedError("prompt-learning adapters are inputs, not weight changes: they cannot be merged "
                                  "into the base model; use unload() to get the bare model back")

    def unload(self) -> nn.Module:
        """Remove the heads' wrappers and return the bare base model (prompts are dropped)."""
        for name, wrapper in list(self.wrappers()):
            parent_name, _, attr = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, attr, wrapper.original_module)
        return self.model

    # ---- the prompts ------------------------------------------------------------------------
    @property
    def active_config(self) -> PromptLearningConfig:
        return self.peft_config[self.active_adapters[0]]

    @property
    def word_embeddings(self) -> nn.Module:
        return find_word_embeddings(self.model)

    @property
    def adapters_enabled(self) -> bool:
        return self._enabled and bool(self.active_adapters)

    def encoder_rows(self, adapter_name: str) -> torch.Tensor:
        """The encoder's output for all its virtual tokens: (tokens, width)."""
        encoder = self.prompt_encoder[adapter_name]
        tokens = torch.arange(encoder.embedding.num_embeddings, device=encoder.embedding.weight.device)
        tokens = tokens.unsqueeze(0)
        if isinstance(encoder, MultitaskPromptEmbedding):
            return encoder.embedding(tokens)[0]
        return encoder(tokens)[0]

    def prompts(self, batch_size: int, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Virtual token embeddings of the active adapter: (batch, tokens, token_dim)."""
        name = self.active_adapters[0]
        encoder = self.prompt_encoder[name]
        if isinstance(encoder, MultitaskPromptEmbedding):
            task_ids = self._task_ids(task_ids, batch_size, encoder)
            tokens = torch.arange(encoder.embedding.num_embeddings, device=encoder.embedding.weight.device)
            return encoder(tokens.unsqueeze(0).expand(batch_size, -1), task_ids)
        rows = self.encoder_rows(name)
        return rows.unsqueeze(0).expand(batch_size, -1, -1)

    def _task_ids(self, task_ids: Any, batch_size: int, encoder: MultitaskPromptEmbedding) -> torch.Tensor:
        if task_ids is None:
            if encoder.num_tasks == 1:
                return torch.zeros(batch_size, dtype=torch.long, device=encoder.embedding.weight.device)
            raise ValueError(f"task_ids=None is not allowed with num_tasks={encoder.num_tasks}; allowed: a tensor "
                             "of task indices, one per example (pass task_ids=... to forward / generate)")
        task_ids = torch.as_tensor(task_ids, device=encoder.embedding.weight.device).long().reshape(-1)
        if task_ids.numel() != batch_size:
            raise ValueError(f"task_ids has {task_ids.numel()} entries for a batch of {batch_size}; "
                             "allowed: one task index per example")
        if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= encoder.num_tasks):
            raise ValueError(f"task_ids={task_ids.tolist()} is not allowed; allowed: indices in "
                             f"[0, {encoder.num_tasks}) (num_tasks={encoder.num_tasks})")
        return task_ids

    def prefix(self, batch_size: int):
        """The active adapter's key/value prefix as a fresh transformers cache."""
        name = self.active_adapters[0]
        rows = self.encoder_rows(name)
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            rows = rows.to(dtype)
        return prefix_cache(rows, self.peft_config[name], batch_size)

    # ---- forward / generate -----------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return fwd.forward(self, *args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return fwd.generate(self, *args, **kwargs)

    # ---- adapter tensors under HF PEFT's file keys ------------------------------------------
    def adapter_state_dict(self, adapter_name: str, *, save_embedding_layers: bool | str = "auto") -> dict[str, torch.Tensor]:
        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        encoder = self.prompt_encoder[adapter_name]
        if isinstance(encoder, MultitaskPromptEmbedding):
            out = {"prompt_embeddings": encoder.embedding.weight, "prefix_task_cols": encoder.prefix_task_cols,
                   "prefix_task_rows": encoder.prefix_task_rows}
        else:
            with torch.no_grad():
                out = {"prompt_embeddings": self.encoder_rows(adapter_name)}
        for path, wrapper in self.wrappers():
            if adapter_name in wrapper.modules_to_save:
                for pname, tensor in wrapper.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
                    out[f"{FILE_PREFIX}{path}.{pname}"] = tensor
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str, *,
                                what: str = "adapter file") -> None:
        from ...save_load import load_into

        if adapter_name not in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} does not exist; adapters: {list(self.peft_config)}")
        encoder = self.prompt_encoder[adapter_name]
        expected = self.adapter_state_dict(adapter_name)
        holder = None
        if getattr(encoder, "reparameterized", False):
            # The file holds the encoder's output; the MLP/LSTM that produced it cannot be recovered.
            current = expected["prompt_embeddings"]
            holder = torch.empty(current.shape, dtype=current.dtype, device=current.device)
            expected["prompt_embeddings"] = holder
        elif not isinstance(encoder, MultitaskPromptEmbedding):
            expected["prompt_embeddings"] = encoder.embedding.weight
        load_into(expected, tensors, {}, what=what)
        if holder is not None:
            trainable = encoder.embedding.weight.requires_grad
            encoder.to_direct(holder)
            encoder.requires_grad_(trainable)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


# ---- helpers --------------------------------------------------------------------------------
def build_encoder(config: PromptLearningConfig, word_embeddings: nn.Module) -> nn.Module:
    kind = config.peft_type
    if kind == PeftType.PROMPT_TUNING.value:
        return PromptEmbedding(config, word_embeddings)
    if kind == PeftType.MULTITASK_PROMPT_TUNING.value:
        return MultitaskPromptEmbedding(config, word_embeddings)
    if kind == PeftType.P_TUNING.value:
        return PromptEncoder(config)
    if kind == PeftType.PREFIX_TUNING.value:
        return PrefixEncoder(config)
    raise ValueError(f"peft_type={kind!r} is not a prompt-learning method")


def find_word_embeddings(model: nn.Module) -> nn.Module:
    """The base model's input token embedding (what virtual tokens are put next to)."""
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = None
    if callable(getter):
        with contextlib.suppress(NotImplementedError, AttributeError):
            embeddings = getter()
    if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        raise ValueError(f"{type(model).__name__} has no input embedding (get_input_embeddings()); "
                         "prompt-learning methods need a model that embeds token ids")
    return embeddings


def _first_attr(config: Any, names: tuple[str, ...], field: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise ValueError(f"{field}=None and the model config has none of {', '.join(names)}; "
                     f"allowed: set {field} in the adapter config")


def fill_model_shapes(config: PromptLearningConfig, model: nn.Module) -> None:
    """Fill the shape fields left ``None`` from the model config (HF PEFT's rules, GQA included)."""
    model_config = getattr(model, "config", None)
    if model_config is not None and hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config()
    if config.num_layers is None:
        config.num_layers = _first_attr(model_config, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    if config.token_dim is None:
        config.token_dim = _first_attr(model_config, ("hidden_size", "n_embd", "d_model"), "token_dim")
    if config.num_attention_heads is None:
        config.num_attention_heads = _first_attr(
            model_config, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"),
            "num_attention_heads")
    kv_heads = getattr(model_config, "num_key_value_heads", None)
    if isinstance(config, PrefixTuningConfig) and isinstance(kv_heads, int):
        # Grouped-query attention caches num_key_value_heads heads: the prefix must match them.
        head_dim = getattr(model_config, "head_dim", None) or config.token_dim // config.num_attention_heads
        config.token_dim = head_dim * kv_heads
        config.num_attention_heads = kv_heads
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    if config.num_transformer_submodules is None:
        config.num_transformer_submodules = 2 if config.task_type == "SEQ_2_SEQ_LM" else 1
    if isinstance(config, PrefixTuningConfig) and config.token_dim % config.num_attention_heads:
        raise ValueError(f"token_dim={config.token_dim} is not allowed with num_attention_heads="
                         f"{config.num_attention_heads}; allowed: a multiple of num_attention_heads")
