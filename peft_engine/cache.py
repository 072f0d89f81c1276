"""On-disk cache of converted base models, safe for many concurrent Ray workers.

Converting a GGUF base (dequantize every tensor, rebuild the tokenizer) takes ~20 s, and a
sweep starts that base in every trial and every Ray Train worker. So a conversion is done
once per machine and stored as a plain Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) that later loads memory-map.

What is cached: GGUF conversions (:func:`gguf_model_dir`), the tiny random models
(:mod:`peft_engine.tiny`) and bitsandbytes-quantized checkpoints
(:func:`load_quantized_cached`).

Layout under the cache root (argument ``cache_dir`` > env ``PEFT_SWEEPS_CACHE`` >
``~/.cache/peft_sweeps``)::

    models/<key>/            finished entries; complete once ``ENTRY_MARKER`` is inside
    models/.tmp-<key>-*/     entries being written (or left by a writer that died)
    locks/<key>.lock         fcntl lock held while an entry is built
    digests.json             stat-keyed index of source-file sha256s

Why it is safe:

* An entry is built in a temporary folder next to its final place and published with one
  ``os.rename``, so a reader sees either no folder or a complete one, never a half one.
* Writers of the same key serialise on an ``fcntl.flock``; the one that waited finds the
  entry done and builds nothing. The kernel drops the lock when its holder dies, so a
  killed writer never blocks the others; the next writer deletes its leftover temp folder.
* Where ``flock`` is not honoured (some network file systems) the rename still decides:
  the first rename wins, a later one fails on the non-empty target and its copy is dropped.
* Keys are content hashes of the source files, so a changed source gets a new entry instead
  of a stale one. Hashing a 100 MB GGUF takes a while, so a digest is remembered per
  (path, size, mtime, inode) in ``digests.json`` and reused while those are unchanged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ENV_CACHE_DIR = "PEFT_SWEEPS_CACHE"
ENTRY_MARKER = "peft_sweeps_cache.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_DIGEST_INDEX = "digests.json"
# How long a writer waits for another writer of the same key (a SmolLM2 conversion takes
# ~20-30 s; many workers may queue behind one) before giving up with an error.
DEFAULT_LOCK_TIMEOUT_S = 1800.0

# Process-local counters, so tests and benchmarks can tell a hit from a (re)build.
_STATS = {"hits": 0, "builds": 0, "digests_computed": 0, "digests_reused": 0}


class CacheError(RuntimeError):
    """A cache entry could not be created or read."""


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve the cache root: ``cache_dir`` > ``$PEFT_SWEEPS_CACHE`` > ``~/.cache/peft_sweeps``."""
    if cache_dir is not None and str(cache_dir) != "":
        root = Path(cache_dir)
    elif os.environ.get(ENV_CACHE_DIR):
        root = Path(os.environ[ENV_CACHE_DIR])
    else:
        root = Path.home() / ".cache" / "peft_sweeps"
    return root.expanduser().resolve()


def cache_stats() -> dict[str, int]:
    """Counters of this process: cache hits, builds, digests hashed vs. reused from the index."""
    return dict(_STATS)


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"cache key {key!r} is not allowed: use 1-200 characters from A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return key


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if missing).

    Polls with a non-blocking lock so a stuck holder turns into a clear error after
    ``timeout_s`` instead of a silent hang of every Ray worker.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise CacheError(
                        f"timed out after {timeout_s:.0f} s waiting for lock {path}; another process "
                        "is building this cache entry (or is stuck doing so)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def entry_path(key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where the entry for ``key`` lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "models" / _check_key(key)


def is_complete(path: Path) -> bool:
    """An entry counts only once its marker file is inside (it is written last)."""
    return (path / ENTRY_MARKER).is_file()


def read_entry_meta(path: Path) -> dict[str, Any]:
    """The metadata a finished entry was published with."""
    with open(path / ENTRY_MARKER, encoding="utf-8") as f:
        return json.load(f)


def get_or_create(
    key: str,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    meta: dict[str, Any] | None = None,
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S,
) -> Path:
    """Return the folder for ``key``, calling ``build(tmp_dir)`` once if it does not exist.

    ``build`` fills the empty folder it is given and may return extra metadata to store in
    the marker. It runs under the key's lock, so at most one process per machine builds a
    key; the others wait and then reuse the result. If ``build`` raises, its folder is removed
    and nothing is published.
    """
    final = entry_path(key, cache_dir)
    if is_complete(final):
        _STATS["hits"] += 1
        return final
    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    lock = cache_root(cache_dir) / "locks" / f"{key}.lock"
    with file_lock(lock, lock_timeout_s):
        if is_complete(final):  # another process finished it while we waited
            _STATS["hits"] += 1
            return final
        # Holding the lock means no live writer of this key: any temp folder is a dead one's.
        for stale in models.glob(f".tmp-{key}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # a folder without marker: not ours to trust; move it out of the way
            _discard(final, models, key)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=models))
        try:
            extra = build(tmp) or {}
            record = {
                "key": key,
                "created_unix": time.time(),
                "pid": os.getpid(),
                **(meta or {}),
                **extra,
            }
            _write_json_atomic(tmp / ENTRY_MARKER, record)
            _fsync_dir(tmp)
            try:
                os.rename(tmp, final)
            except OSError:
                # Rename-wins fallback: someone published first (lock not honoured here).
                if not is_complete(final):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                _STATS["hits"] += 1
                return final
            _fsync_dir(models)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _STATS["builds"] += 1
    return final


def _discard(path: Path, parent: Path, key: str) -> None:
    trash = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-trash-", dir=parent))
    os.rename(path, trash / "old")
    shutil.rmtree(trash, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json_atomic(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Plain sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """sha256 of ``path``, reused from the stat-keyed index while size/mtime/inode are unchanged."""
    real = os.path.realpath(path)
    st = os.stat(real)
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino, "dev": st.st_dev}
    root = cache_root(cache_dir)
    index_path = root / _DIGEST_INDEX
    known = _read_index(index_path).get(real)
    if known and all(known.get(k) == v for k, v in stamp.items()) and "sha256" in known:
        _STATS["digests_reused"] += 1
        return known["sha256"]
    digest = sha256_file(real)
    _STATS["digests_computed"] += 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / "locks" / "digests.lock", timeout_s=60.0):
            index = _read_index(index_path)
            index[real] = {**stamp, "sha256": digest}
            _write_json_atomic(index_path, index)
    except OSError:  # a read-only (e.g. pre-filled, shared) cache: the digest is still right
        pass
    return digest


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def cache_info(cache_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """List finished entries with their metadata and size on disk (bytes)."""
    models = cache_root(cache_dir) / "models"
    out: list[dict[str, Any]] = []
    if not models.is_dir():
        return out
    for entry in sorted(models.iterdir()):
        if entry.name.startswith(".") or not is_complete(entry):
            continue
        size = sum(p.stat().st_size for p in entry.rglob("*") if p.is_file())
        out.append({"key": entry.name, "path": str(entry), "bytes": size, **read_entry_meta(entry)})
    return out


def clear_cache(key: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Remove one entry (``key``) or all entries; returns how many were removed.

    Each removal holds the key's lock and renames the entry away first, so a concurrent
    ``get_or_create`` never sees a half-deleted folder as complete.
    """
    root = cache_root(cache_dir)
    models = root / "models"
    if not models.is_dir():
        return 0
    keys = [_check_key(key)] if key is not None else [p.name for p in models.iterdir() if not p.name.startswith(".")]
    removed = 0
    for k in keys:
        path = models / k
        with file_lock(root / "locks" / f"{k}.lock"):
            if path.exists():
                _discard(path, models, k)
                removed += 1
    return removed


# ----------------------------------------------------------------------------- what gets cached

# Bump when the GGUF -> safetensors conversion changes, so old cache entries are not reused.
GGUF_CONVERT_VERSION = 1


def gguf_cache_key(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Cache key of a GGUF file: its name stem plus its content hash and the converter version."""
    import transformers

    digest = file_digest(gguf_path, cache_dir)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(gguf_path).stem).strip("-.")[:60] or "model"
    tf_major = transformers.__version__.split(".")[0]
    return f"gguf-{stem}-{digest[:16]}-c{GGUF_CONVERT_VERSION}tf{tf_major}"


def convert_gguf(gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Dequantize a GGUF into a float32 safetensors HF folder (model + tokenizer) at ``out_dir``.

    float32 keeps the dequantized values exactly (Q4_1 values are fp16 scale x int + fp16 min,
    not representable in bf16); a bf16 load of the folder then rounds once, like any base.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = Path(gguf_path)
    kwargs = {"gguf_file": src.name, "local_files_only": True}
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), **kwargs)
    # The folder holds plain float weights: drop the GGUF quantizer so loads do not expect one.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length is None or tokenizer.model_max_length > 10**8):
        tokenizer.model_max_length = int(max_pos)  # GGUF carries no limit; transformers' default is 1e30
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return {"kind": "gguf", "architecture": type(model).__name__, "model_type": model.config.model_type}


def gguf_model_dir(gguf_path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Converted folder for a GGUF, converting it (once per machine, under a lock) if needed."""
    path = Path(gguf_path).expanduser().resolve()
    key = gguf_cache_key(path, cache_dir)
    return get_or_create(
        key,
        lambda tmp: convert_gguf(path, tmp),
        cache_dir=cache_dir,
        meta={"source": str(path), "sha256": file_digest(path, cache_dir)},
    )


def folder_content_id(folder: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> str:
    """Identity of a local model folder: the sha256 of its top-level .safetensors and .json files."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in {".safetensors", ".json"} and p.is_file())
    return "|".join(f"{p.name}:{file_digest(p, cache_dir)}" for p in files)


class _NotCacheable(Exception):
    """Raised inside a cache build to publish nothing; carries the model it loaded anyway."""

    def __init__(self, model: Any, reason: str) -> None:
        super().__init__(reason)
        self.model = model


def load_quantized_cached(
    auto_cls: Any,
    source_path: str,
    source_id: str,
    kwargs: dict[str, Any],
    *,
    device_type: str,
    cache_dir: str | os.PathLike[str] | None = None,
    label: str | None = None,
) -> Any:
    """``auto_cls.from_pretrained(source_path, **kwargs)`` with a bitsandbytes config, quantizing
    at most once per machine: the first call stores the quantized checkpoint, later ones load it.

    bitsandbytes quantizes on CPU with plain torch ops (SmolLM2-135M on 2 busy cores: ~15-45 s
    for nf4), which every trial and Ray worker would pay again. transformers saves and reloads
    bnb-quantized checkpoints bit-exactly (checked in tests), so the first load saves one keyed
    by ``source_id`` (the source weights' identity) and every setting that shapes the result. A
    model whose checkpoint lacks some weights (e.g. a new classification head, drawn at random)
    is returned uncached, since caching it would freeze one random draw for every later run.
    """
    import bitsandbytes
    import transformers

    qconfig = kwargs["quantization_config"]
    params = {
        "source": source_id,
        "class": auto_cls.__name__,
        "num_labels": kwargs.get("num_labels"),
        "dtype": str(kwargs.get("dtype")),
        "quantization": qconfig.to_dict(),
        "device_type": device_type,
        "bitsandbytes": bitsandbytes.__version__,
        "transformers": transformers.__version__,
    }
    digest = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:20]
    mode = qconfig.bnb_4bit_quant_type if qconfig.load_in_4bit else "int8"

    def build(tmp: Path) -> dict[str, Any]:
        model, info = auto_cls.from_pretrained(source_path, output_loading_info=True, **kwargs)
        if info.get("missing_keys"):
            raise _NotCacheable(model, f"missing keys {sorted(info['missing_keys'])[:5]}")
        model.save_pretrained(str(tmp), safe_serialization=True)
        return {"kind": "bnb", "params": params}

    try:
        folder = get_or_create(f"bnb-{mode}-{digest}", build, cache_dir=cache_dir, meta={"source": label or source_path})
    except _NotCacheable as e:
        return e.model
    load_kwargs = {k: v for k, v in kwargs.items() if k != "quantization_config"}
    return auto_cls.from_pretrained(str(folder), **load_kwargs)
