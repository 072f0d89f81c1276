"""Which modules an adapter wraps.

HF PEFT's matching rules, kept in one place: a string ``target_modules`` is a regex that must
match the whole module name; a list matches a module whose name equals an entry or ends with
``"." + entry``; ``"all-linear"`` is every Linear / transformers Conv1D except the output head.
``layers_to_transform`` keeps only modules inside the given layer indices. With no targets,
the per-architecture defaults below apply, and the sweep's named presets (attention, mlp)
resolve through :func:`resolve_target_preset`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

ALL_LINEAR = "all-linear"
TARGET_PRESETS = ("attention", "mlp", ALL_LINEAR)

# Defaults when target_modules is None: HF PEFT's choices (query and value projections).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

_LLAMA_LIKE = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
# Named presets for sweeps, per architecture family.
TARGET_PRESET_MODULES: dict[str, dict[str, list[str]]] = {
    **{arch: _LLAMA_LIKE for arch in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2")},
    "gpt2": {"attention": ["c_attn", "attn.c_proj"], "mlp": ["c_fc", "mlp.c_proj"]},
    "gpt_neox": {"attention": ["query_key_value", "attention.dense"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]},
    "opt": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "bart": {"attention": ["q_proj", "k_proj", "v_proj", "out_proj"], "mlp": ["fc1", "fc2"]},
    "t5": {"attention": ["q", "k", "v", "o"], "mlp": ["wi", "wo", "wi_0", "wi_1"]},
    **{
        arch: {"attention": ["query", "key", "value", "attention.output.dense"], "mlp": ["intermediate.dense", r"output.dense"]}
        for arch in ("bert", "roberta", "xlm-roberta")
    },
}

# Sibling modules that transformers' models call one after the other on the same input tensor:
# LoRA computes such siblings together (peft_engine.tuners.lora.shared_input). A model where
# they do not share an input (cross-attention's k/v) is detected at run time and runs them alone.
SHARED_INPUT_SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),  # llama, mistral, qwen2, gemma, opt, bart, gptj ...
    ("gate_proj", "up_proj"),  # llama-family gated MLPs
    ("query", "key", "value"),  # bert, roberta
    ("q", "k", "v"),  # t5
    ("wi_0", "wi_1"),  # t5 v1.1 gated MLP
)

_LAYER_PATTERNS = ("layers", "h", "block", "blocks", "layer")


def __getattr__(name: str) -> Any:
    """``Conv1D`` (transformers' GPT-2 style layer, weights stored transposed), imported on first
    use: the names above are read by sweep validation, which must not pay for torch."""
    if name == "Conv1D":
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@cache
def linear_types() -> tuple[type, ...]:
    """The layer kinds "all-linear" and the linear adapters wrap: nn.Linear and Conv1D."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def match_target(name: str, targets: str | Iterable[str] | None) -> bool:
    """HF PEFT's rule: regex full match for a string, name or dotted suffix for a list."""
    if targets is None:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The transformer block index in a module name (``model.layers.3.mlp`` -> 3), if any."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or _LAYER_PATTERNS)
    for pattern in patterns:
        found = re.match(rf"(?:.*\.)?{re.escape(pattern)}\.(\d+)(?:\.|$)", name)
        if found:
            return int(found.group(1))
    return None


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output embedding (lm_head), which "all-linear" never wraps."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is None:
        return set()
    return {name for name, module in model.named_modules() if module is head}


def targetable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module a target may name, as HF PEFT sees a model with adapters.

    An adapter layer (or modules_to_save wrapper) stands for the module it wraps, under that
    module's name; its insides (``base_layer``, ``lora_A.default`` ...) are never targets, so a
    second adapter with "all-linear" or a loose regex wraps the same modules as the first.
    """
    out: list[tuple[str, nn.Module]] = []
    inside: str | None = None  # named_modules is depth-first: a wrapper's insides follow it directly
    for name, module in model.named_modules():
        if not name or (inside is not None and name.startswith(inside)):
            continue
        inside = None
        if hasattr(module, "adapter_layer_names") or hasattr(module, "original_module"):
            inside = name + "."
            while hasattr(module, "adapter_layer_names") or hasattr(module, "original_module"):
                base = getattr(module, "base_layer", None)
                module = base if base is not None else module.original_module
        out.append((name, module))
    return out


def all_linear_names(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    heads = output_head_names(model) | set(exclude)
    return [
        name
        for name, module in targetable_modules(model)
        if isinstance(module, linear_types()) and name not in heads and name.split(".")[-1] not in heads
    ]


def candidate_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the modules an adapter could wrap, for error messages."""
    from torch import nn

    wrappable = linear_types() + (nn.Embedding, nn.Conv1d, nn.Conv2d)
    return sorted({name.split(".")[-1] for name, m in targetable_modules(model) if isinstance(m, wrappable)})


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module) -> list[str]:
    arch = model_type(model)
    if arch not in DEFAULT_LORA_TARGETS:
        raise ValueError(
            f"target_modules=None but there are no default targets for model_type={arch!r}; "
            f"set target_modules (known defaults: {', '.join(sorted(DEFAULT_LORA_TARGETS))}); "
            f"candidate modules: {', '.join(candidate_module_names(model))}"
        )
    return list(DEFAULT_LORA_TARGETS[arch])


def resolve_target_preset(preset: str | list[str], model: nn.Module) -> str | list[str]:
    """Turn a sweep's target preset into ``target_modules`` for this model's architecture.

    ``attention`` / ``mlp`` look up the architecture family; ``all-linear`` passes through;
    a list or a regex string is used as it is.
    """
    if isinstance(preset, list) or preset == ALL_LINEAR or preset not in TARGET_PRESETS:
        return preset
    arch = model_type(model)
    family = TARGET_PRESET_MODULES.get(arch or "")
    if family is None:
        raise ValueError(
            f"targets={preset!r} has no module list for model_type={arch!r}; "
            f"use 'all-linear' or an explicit list (candidates: {', '.join(candidate_module_names(model))})"
        )
    return list(family[preset])


def select_targets(
    model: nn.Module,
    target_modules: str | list[str] | None,
    *,
    exclude_modules: str | list[str] | None = None,
    layers_to_transform: int | list[int] | None = None,
    layers_pattern: str | list[str] | None = None,
    skip: Iterable[str] = (),
) -> list[str]:
    """Names of the modules of ``model`` to wrap; raise with the candidates if there are none."""
    if target_modules is None:
        target_modules = default_targets(model)
    if target_modules == ALL_LINEAR:
        names = all_linear_names(model, exclude=skip)
    else:
        names = [name for name, _ in targetable_modules(model) if match_target(name, target_modules)]
    skip = set(skip)
    names = [n for n in names if n not in skip and not any(n.startswith(s + ".") for s in skip)]
    matched = list(names)
    if exclude_modules is not None:
        names = [n for n in names if not match_target(n, exclude_modules)]
    if layers_to_transform is not None:
        wanted = {layers_to_transform} if isinstance(layers_to_transform, int) else set(layers_to_transform)
        names = [n for n in names if layer_index(n, layers_pattern) in wanted]
    if not names:
        # Say which setting emptied the list: the targets themselves, or the filters after them.
        filters = f" after exclude_modules={exclude_modules!r}, layers_to_transform={layers_to_transform!r}" \
            if matched else ""
        raise ValueError(
            f"target_modules={target_modules!r} matched no module of {type(model).__name__}{filters}; "
            f"candidate modules: {', '.join(candidate_module_names(model))}"
        )
    return names
