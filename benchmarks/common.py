"""Shared benchmark helpers: interleaved timing, medians, memory, goals, tables, JSON results.

Why interleaved: on a shared machine the speed of the CPU drifts (other processes, thermal
limits, caches). Timing A five times and then B five times puts that drift into the A/B
ratio; running A, B, C, A, B, C, ... (and rotating who goes first) spreads it evenly, and
the per-repeat differences of neighbours (``paired_median``) cancel most of it.
"""

from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "peft", "ray", "mlflow", "datasets", "accelerate", "peft-sweeps")


# ----------------------------------------------------------------------------- threads and sync


def set_threads(threads: int | None = None) -> int:
    """Pin torch's intra-op threads (default: every CPU this process may use) and return the count.

    Every side of a comparison runs in the same process, so they all get the same count.
    """
    import torch

    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()


_ALLOCATOR = "glibc malloc, default settings"
KEEP_FREED_HELP = ("glibc keeps freed memory (no page faults for re-mapped buffers): times arithmetic and "
                   "dispatch alone; recorded as environment.allocator (default: the allocator as a user gets it)")


def keep_freed_memory() -> str:
    """Tell glibc's malloc to keep memory this process frees instead of handing it back to the OS.

    Why: by default glibc returns freed heap tops and large (mmap'ed) blocks to the kernel, and the
    next allocation of that size maps fresh pages: one minor page fault per 4 KiB touched. A step
    of SmolLM2 that happens to re-map its 3 MiB MLP activations pays ~1-2 ms for it, and which
    step does so depends on the allocation pattern of everything before it. With freed memory
    kept (mallopt: no trimming, no mmap'ed blocks) no step pays that after warm-up, so a run times
    the arithmetic and the Python alone. The default stays what a user's process gets; this is a
    second view, recorded in each results file (``environment.allocator``). Returns that label.
    """
    global _ALLOCATOR
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    mallopt = getattr(libc, "mallopt", None)
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h> parameter numbers
    if mallopt is None or not (mallopt(m_trim_threshold, 2**31 - 1) and mallopt(m_mmap_max, 0)):
        raise SystemExit("--keep-freed-memory needs glibc's mallopt (Linux); this C library has none")
    _ALLOCATOR = "glibc malloc, freed memory kept (no trimming, no mmap'ed blocks)"
    return _ALLOCATOR


def synchronize(device: Any = None) -> None:
    """Wait for queued GPU work so a timer measures it (a no-op on CPU)."""
    import torch

    if device is not None and str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Timings:
    """Seconds per call of each named function, in the order the repeats ran, and the minor page
    faults each call took (on CPU a fresh page costs a few microseconds to map and zero, and
    which side pays them moves a step by tenths of a second: see README, "Page faults")."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, list[int]] = field(default_factory=dict)

    def median(self, name: str) -> float | None:
        return median(self.samples.get(name, []))

    def paired_median(self, a: str, b: str) -> float | None:
        """Median of ``a_i - b_i`` over repeats: how much longer ``a`` takes than ``b`` next to it."""
        xs, ys = self.samples.get(a, []), self.samples.get(b, [])
        return median([x - y for x, y in zip(xs, ys)])

    def ratio(self, a: str, b: str) -> float | None:
        ma, mb = self.median(a), self.median(b)
        return ma / mb if ma is not None and mb else None

    def spread(self, name: str) -> float | None:
        """(max - min) / median: a rough noise figure, printed so a reader can judge a ratio."""
        xs = self.samples.get(name, [])
        m = median(xs)
        return (max(xs) - min(xs)) / m if xs and m else None

    def median_faults(self, name: str) -> float | None:
        return median(self.faults.get(name, []))

    def to_json(self) -> dict[str, Any]:
        return {name: {"median_s": median(xs), "samples_s": [round(x, 6) for x in xs],
                       "median_minor_faults": self.median_faults(name), "minor_faults": self.faults.get(name, [])}
                for name, xs in self.samples.items()}

    def interval(self, statistic: Callable[[Timings], float | None], level: float = 0.9, draws: int = 2000,
                 seed: int = 0) -> tuple[float, float] | None:
        """A bootstrap interval of ``statistic`` over rounds (whole rounds resampled, so pairs stay paired).

        Why: on two cores a round's floor drifts by as much as a small adapter's overhead, so a
        ratio from a dozen rounds can land on either side of a goal; the interval says how far.
        """
        rounds = min((len(xs) for xs in self.samples.values()), default=0)
        if rounds < 3:
            return None
        rng = random.Random(seed)
        values = []
        for _ in range(draws):
            picks = [rng.randrange(rounds) for _ in range(rounds)]
            value = statistic(Timings({n: [xs[i] for i in picks] for n, xs in self.samples.items()}))
            if value is not None:
                values.append(value)
        if len(values) < draws // 2:
            return None
        values.sort()
        tail = (1 - level) / 2
        return values[int(tail * (len(values) - 1))], values[int((1 - tail) * (len(values) - 1))]


def interleaved(fns: Mapping[str, Callable[[], Any]], *, warmup: int, repeats: int, device: Any = None,
                rotate: bool = True) -> Timings:
    """Call every function ``warmup`` times untimed, then ``repeats`` timed rounds of all of them.

    Each round calls every function once; with ``rotate`` the starting function moves by one
    each round, so none is always first (after a pause) or always last.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        synchronize(device)
    timings = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)] if rotate else names
        for name in order:
            synchronize(device)
            faults = minor_faults()
            started = time.perf_counter()
            fns[name]()
            synchronize(device)
            timings.samples[name].append(time.perf_counter() - started)
            timings.faults[name].append(minor_faults() - faults)
    return timings


def minor_faults() -> int:
    """Minor page faults of this process so far (pages mapped fresh, without disk I/O)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ----------------------------------------------------------------------------- memory


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children), in MiB (Linux: ru_maxrss is KiB)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
    return usage.ru_maxrss * scale


def current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20


def saved_for_backward_mb(run_loss: Callable[[], Any], exclude: Iterable[Any]) -> float:
    """MiB of distinct storages autograd keeps for backward while ``run_loss()`` runs, then backward.

    Exact and noise-free, unlike RSS (which only grows, and is shared by everything in one
    process): this is the activation memory an adapter implementation adds. Storages of
    ``exclude`` (the model's weights and buffers) are not counted; the caller clears gradients.
    """
    import torch

    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: Any) -> Any:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run_loss()
    loss.backward()
    return sum(seen.values()) / 2**20


def trainable_state_mb(params: Iterable[Any]) -> float:
    """Parameters + gradients + AdamW's two moments, in MiB."""
    return 4 * sum(p.numel() * p.element_size() for p in params) / 2**20


def cuda_peak_mb(fn: Callable[[], Any], device: Any) -> float | None:
    """Peak CUDA memory allocated while ``fn()`` runs (None on CPU)."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**20


# ----------------------------------------------------------------------------- identical adapters


def copy_trainable_by_name(ours: Any, hf: Any) -> bool:
    """Copy our trainable tensors into HF PEFT's same-named ones; True when every HF tensor got one.

    Names agree up to a prefix (our prompt-learning tuner adds ``base_model.``), so a name
    matches when one ends with ``"." +`` the other.
    """
    import torch

    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    by_suffix: dict[str, list[str]] = {}
    for n in mine:
        parts = n.split(".")
        for i in range(len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(n)
    pairs = []
    for n, p in hf.named_parameters():
        if not p.requires_grad:
            continue
        found = by_suffix.get(n) or next((by_suffix[s] for s in _suffixes(n) if s in by_suffix), [])
        if len(found) != 1 or mine[found[0]].shape != p.shape:
            return False
        pairs.append((p, mine[found[0]]))
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)
    return bool(pairs)


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(1, len(parts))]


def perturb_trainable(model: Any, seed: int = 7, std: float = 0.02) -> None:
    """Move every trainable tensor off its init (LoRA's B = 0 etc.), so the adapter changes outputs."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


# ----------------------------------------------------------------------------- goals and tables


def goal(value: float | None, limit: float, *, at_most: bool = True) -> dict[str, Any]:
    """A goal as data: ``value <= limit`` (or ``>=`` with ``at_most=False``); ``pass`` is None without a value."""
    ok = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "op": "<=" if at_most else ">=", "pass": ok}


def mark(g: Mapping[str, Any] | None) -> str:
    if not g or g.get("pass") is None:
        return "n/a"
    return "PASS" if g["pass"] else "FAIL"


def fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table; ``columns`` are ``(key, header)``; values are printed as given (strings)."""
    cells = [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max([len(header)] + [len(c[i]) for c in cells]) for i, (_, header) in enumerate(columns)]
    line = "  ".join(header.ljust(w) for (_, header), w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cell, widths)) for cell in cells]
    return "\n".join(out)


# ----------------------------------------------------------------------------- results


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip() or "unknown"
        return commit + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces a run, e.g. ``.venv/bin/python -m benchmarks.engine --quick``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([".venv/bin/python", "-m", module, *args])


def environment(command: str | None = None) -> dict[str, Any]:
    """What a reader needs to judge the numbers: versions, CPUs, threads, load, command line."""
    from sweeps.tracking import package_versions

    try:
        import torch

        threads = torch.get_num_threads()
        cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover - torch is a hard dependency
        threads, cuda = None, None
    return {
        "command": command,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads,
        "allocator": _ALLOCATOR,
        "cuda_device": cuda,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "packages": package_versions(PACKAGES),
    }


def write_json(name: str, payload: Mapping[str, Any], *, command: str | None = None,
               results_dir: Path | None = None) -> Path:
    """Write ``<results_dir>/<name>.json`` (default ``benchmarks/results``) with the environment added."""
    folder = Path(results_dir) if results_dir else RESULTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    data = {"benchmark": name, "environment": environment(command), **payload}
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return repr(value)
