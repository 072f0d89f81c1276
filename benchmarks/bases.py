"""Base loader: cold GGUF conversion vs cached load, and what each quantization mode costs.

    .venv/bin/python -m benchmarks.bases                  # SmolLM2-135M-Instruct, modes none,int8,nf4
    .venv/bin/python -m benchmarks.bases --quick          # tiny-random-llama, a smoke run of the script
    .venv/bin/python -m benchmarks.bases --cache-dir DIR  # reuse DIR (then "cold" is only cold once)

Each measurement runs in its own subprocess so peak RSS (``ru_maxrss``) belongs to that one
load alone, and every timer starts after the imports (transformers' model modules included),
so both sides of the cold/cached ratio pay the same fixed costs:

1. ``convert``: with an empty cache, ``load_base(spec)`` converts the GGUF (dequantize, write
   safetensors + tokenizer) and loads it: the cold time. The same process then makes the
   first quantized load of each mode (bitsandbytes quantizes on CPU, then the result is cached).
2. ``measure`` per mode: a cached ``load_base`` (safetensors memory-mapped; quantized modes
   read the cached bnb checkpoint): load time, base weight bytes (incl. quantization
   statistics), and RSS above the after-imports baseline: after one tiny forward (all weights
   resident; mapped safetensors pages count only once read) and at the peak of one training
   step (adds activations).
3. ``train``: every mode loaded in one process and their training steps interleaved, so a
   drift in machine load hits all modes alike. A step is forward + backward on a batch of
   4 x 128 tokens with the base frozen and one trainable vector added to the input
   embeddings, so backward runs through every (quantized) layer as an adapter's would.

Goals: cached load >= 10x faster than cold; nf4 base bytes <= 0.30x float32 bytes.
Results: benchmarks/results/bases.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import command_line, fmt, format_table, goal, mark, peak_rss_mb, set_threads, write_json

REPO = Path(__file__).resolve().parents[1]
RESULT_PREFIX = "RESULT "


# ----------------------------------------------------------------------------- subprocess jobs


def _preimport() -> None:
    """Import what a load touches lazily, so timers measure loading and not Python imports."""
    import bitsandbytes  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401

    transformers.AutoTokenizer  # noqa: B018 - resolves the lazy module
    import peft_engine.bases  # noqa: F401


def _job_convert(job: dict[str, Any]) -> dict[str, Any]:
    from peft_engine import cache
    from peft_engine.bases import load_base

    started = time.perf_counter()
    model, _ = load_base(job["spec"], cache_dir=job["cache_dir"])
    cold = time.perf_counter() - started
    out: dict[str, Any] = {"cold_load_s": cold, "entry": model.name_or_path, "stats": cache.cache_stats()}
    del model
    first_quantized = {}
    for mode in job["quantized_modes"]:
        started = time.perf_counter()
        model, _ = load_base(job["spec"], cache_dir=job["cache_dir"], quantization=mode)
        first_quantized[mode] = time.perf_counter() - started
        del model
    out["first_quantized_load_s"] = first_quantized
    return out


def _job_measure(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from peft_engine.bases import base_weight_bytes, load_base

    rss_base = peak_rss_mb()
    started = time.perf_counter()
    model, _ = load_base(job["spec"], cache_dir=job["cache_dir"], quantization=job["mode"])
    load_s = time.perf_counter() - started
    rss_load = peak_rss_mb()
    with torch.no_grad():  # touches every weight (memory-mapped pages count once read) at tiny activation cost
        model(input_ids=torch.zeros(1, 8, dtype=torch.long))
    rss_resident = peak_rss_mb()
    weight_bytes = base_weight_bytes(model)
    bf16_rest = sum(  # the same model with every non-quantized float tensor in bf16 (QLoRA's usual setup)
        (p.numel() * 2 if p.dtype == torch.float32 else p.numel() * p.element_size()) for p in model.parameters()
    ) + (weight_bytes - sum(p.numel() * p.element_size() for p in model.parameters()))

    step = _make_step(model, job["batch"], job["seq_len"])
    started = time.perf_counter()
    loss = step()
    first_step_s = time.perf_counter() - started
    return {
        "mode": job["mode"],
        "cached_load_s": load_s,
        "weight_bytes": weight_bytes,
        "weight_bytes_bf16_rest": bf16_rest,
        "rss_after_imports_mb": rss_base,
        "peak_rss_after_load_mb": rss_load,
        "load_rss_delta_mb": rss_load - rss_base,
        "resident_rss_delta_mb": rss_resident - rss_base,
        "peak_rss_after_train_mb": peak_rss_mb(),
        "first_step_s": first_step_s,
        "loss": loss,
        "entry": model.name_or_path,
    }


def _make_step(model: Any, batch: int, seq_len: int) -> Callable[[], float]:
    """A training step of a frozen base with one trainable vector on the input embeddings."""
    import torch
    from torch import nn

    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    extra = nn.Parameter(torch.zeros(model.config.hidden_size))
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    embed = model.get_input_embeddings()

    def step() -> float:
        loss = model(inputs_embeds=embed(ids) + extra, labels=ids).loss
        loss.backward()
        extra.grad = None
        return loss.item()

    return step


def _job_train(job: dict[str, Any]) -> dict[str, Any]:
    """All modes in one process, steps interleaved (none, int8, nf4, int8, nf4, none, ...), so
    a drift in machine load (other jobs on a shared box) hits every mode alike."""
    from peft_engine.bases import load_base

    from .common import interleaved

    steps = {}
    for mode in job["modes"]:
        model, _ = load_base(job["spec"], cache_dir=job["cache_dir"], quantization=mode)
        steps[mode] = _make_step(model, job["batch"], job["seq_len"])
    timings = interleaved(steps, warmup=job["warmup"], repeats=job["steps"])
    return {"timings": timings.to_json(), "ratio_vs_none": {m: timings.ratio(m, "none") for m in job["modes"]}}


def _run_job(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bases", "--job", json.dumps(job)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise RuntimeError(f"job {job['kind']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="smollm2-135m-instruct")
    parser.add_argument("--modes", default="none,int8,nf4", help="comma-separated quantization modes")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder, removed afterwards")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per mode (interleaved)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny-random-llama, 1 step: checks the script runs")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    set_threads()
    if args.job:
        job = json.loads(args.job)
        _preimport()
        result = {"convert": _job_convert, "measure": _job_measure, "train": _job_train}[job["kind"]](job)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return result

    if args.quick:
        args.spec, args.steps, args.seq_len = "tiny-random-llama", 1, 32
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    own_cache = args.cache_dir is None
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench-bases-")
    started = time.perf_counter()
    try:
        convert = _run_job(
            {
                "kind": "convert",
                "spec": args.spec,
                "cache_dir": cache_dir,
                "quantized_modes": [m for m in modes if m != "none"],
            },
            timeout_s=900,
        )
        measured = {}
        for mode in modes:
            job = {
                "kind": "measure",
                "spec": args.spec,
                "cache_dir": cache_dir,
                "mode": mode,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "warmup": args.warmup,
            }
            measured[mode] = _run_job(job, timeout_s=900)
        train = _run_job(
            {
                "kind": "train",
                "spec": args.spec,
                "cache_dir": cache_dir,
                "modes": modes,
                "batch": args.batch,
                "seq_len": args.seq_len,
                "steps": args.steps,
                "warmup": args.warmup,
            },
            timeout_s=1200,
        )
    finally:
        if own_cache:
            shutil.rmtree(cache_dir, ignore_errors=True)
    total_s = time.perf_counter() - started

    base = measured.get("none")
    cached_s = base["cached_load_s"] if base else None
    ratio = convert["cold_load_s"] / cached_s if cached_s else None
    fp32_bytes = base["weight_bytes"] if base else None
    rows = []
    for mode, r in measured.items():
        rel = r["weight_bytes"] / fp32_bytes if fp32_bytes else None
        rows.append(
            {
                "mode": mode,
                "first_load_s": fmt(convert["first_quantized_load_s"].get(mode, convert["cold_load_s"]), ".1f"),
                "cached_load_s": fmt(r["cached_load_s"], ".2f"),
                "weight_mb": fmt(r["weight_bytes"] / 2**20, ".1f"),
                "x_fp32": fmt(rel, ".3f"),
                "bf16_rest_x_fp32": fmt(r["weight_bytes_bf16_rest"] / fp32_bytes if fp32_bytes else None, ".3f"),
                "resident_mb": fmt(r["resident_rss_delta_mb"], ".0f"),
                "train_rss_mb": fmt(r["peak_rss_after_train_mb"] - r["rss_after_imports_mb"], ".0f"),
                "step_s": fmt(train["timings"][mode]["median_s"], ".2f"),
                "step_x": fmt(train["ratio_vs_none"].get(mode), ".2f"),
                "loss": fmt(r["loss"], ".3f"),
            }
        )
    nf4 = measured.get("nf4")
    goals = {
        "cached_load_speedup": goal(ratio, 10.0, at_most=False),
        "nf4_bytes_vs_fp32": goal(nf4["weight_bytes"] / fp32_bytes if nf4 and fp32_bytes else None, 0.30),
        "nf4_bf16_rest_bytes_vs_fp32": goal(
            nf4["weight_bytes_bf16_rest"] / fp32_bytes if nf4 and fp32_bytes else None, 0.30
        ),
    }
    print(f"base {args.spec}: cold load (convert/build) {convert['cold_load_s']:.1f} s, "
          f"cached {fmt(cached_s, '.2f')} s -> {fmt(ratio, '.1f')}x  [{mark(goals['cached_load_speedup'])}]")
    columns = [
        ("mode", "mode"),
        ("first_load_s", "first load s"),
        ("cached_load_s", "cached load s"),
        ("weight_mb", "weights MiB"),
        ("x_fp32", "x fp32"),
        ("bf16_rest_x_fp32", "x fp32 (bf16 rest)"),
        ("resident_mb", "RSS +MiB (1 fwd)"),
        ("train_rss_mb", "RSS +MiB (train)"),
        ("step_s", f"step s ({args.batch}x{args.seq_len})"),
        ("step_x", "x none"),
        ("loss", "loss"),
    ]
    print(format_table(rows, columns))
    for name, g in goals.items():
        print(f"goal {name}: {fmt(g['value'], '.3f')} {g['op']} {g['limit']}  [{mark(g)}]")
    print(f"total {total_s:.0f} s")
    payload = {
        "spec": args.spec,
        "settings": {k: getattr(args, k) for k in ("modes", "batch", "seq_len", "steps", "warmup", "quick")},
        "cold_load_s": convert["cold_load_s"],
        "cached_load_s": cached_s,
        "cached_speedup": ratio,
        "first_quantized_load_s": convert["first_quantized_load_s"],
        "modes": measured,
        "train_steps": train,
        "goals": goals,
        "total_s": total_s,
        "notes": (
            "x fp32 (bf16 rest): the same quantized layers with every non-quantized tensor (embeddings, "
            "norms, lm_head tied to the embeddings) counted at 2 bytes, i.e. load_base(dtype='bfloat16'); "
            "computed from the float32 load, not loaded."
        ),
    }
    name = "bases_quick" if args.quick else "bases"
    path = write_json(name, payload, command=command_line("benchmarks.bases", argv))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
