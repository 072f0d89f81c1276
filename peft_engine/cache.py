"""On-disk cache of converted base models, safe for many concurrent Ray workers.

Converting a GGUF base (dequantize every tensor, rebuild the tokenizer) takes ~20 s, and a
sweep starts that base in every trial and every Ray Train worker. So a conversion is done
once per machine and stored as a plain Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) that later loads memory-map.

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
