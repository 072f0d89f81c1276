"""Adapter overhead per layer: peft_engine vs HF PEFT on each of a model's target layers, alone.

    .venv/bin/python -m benchmarks.layers                          # every engine row, SmolLM2's shapes
    .venv/bin/python -m benchmarks.layers --rows lora-r16-attn,loha-r16-attn --repeats 60

Why: on a whole SmolLM2 step (~2.3 s on two cores) the floor drifts by +-0.1 s from round to
round, which is as large as a rank-16 adapter's whole overhead; ``benchmarks.engine`` then
cannot tell 0.6x from 1.0x. Here each distinct target layer of the model (layer 0's q/k/v/o,
gate/up/down, with their real weights) is wrapped alone by both engines with identical adapter
weights, and one training step of it (forward, backward to the input and the adapter, fused
AdamW) is timed next to the frozen layer's (forward, backward to the input), interleaved, over
many rounds. A layer's overhead is the median of the paired differences; the model's overhead is
the sum over its targeted layers (x the number of blocks). Batch 4 x 128 tokens, as the engine
benchmark. What this leaves out, by design: anything between the layers (it is the same base
model on both sides). Results: benchmarks/results/layers.json.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import peft_engine
from sweeps.worker import make_adamw

from .common import (
    KEEP_FREED_HELP,
    Timings,
    command_line,
    fmt,
    format_table,
    goal,
    interleaved,
    keep_freed_memory,
    mark,
    set_threads,
    write_json,
)
from .engine import BATCH, PROMPT_METHODS, SEQ_LEN, Row, load_model, select_rows


class OneLayer(nn.Module):
    """A model holding one target layer under its own short name, so target lists stay the same."""

    def __init__(self, name: str, layer: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def target_layers(model: nn.Module, row: Row) -> dict[str, tuple[nn.Module, int]]:
    """The row's target layers by short name: layer 0's module and how many blocks have one."""
    probe = peft_engine.get_peft_model(copy.deepcopy(model), adapter_config(row, row.targets))
    found: dict[str, tuple[nn.Module, int]] = {}
    for name, module in probe.named_modules():
        if isinstance(module, peft_engine.tuners.base.AdapterLayer):
            short = name.rsplit(".", 1)[-1]
            layer, count = found.get(short, (None, 0))
            found[short] = (layer or copy.deepcopy(module.get_base_layer()), count + 1)
    return found


def adapter_config(row: Row, targets: Any, *, hf: bool = False) -> Any:
    spec = peft_engine.get_method(row.method)
    kwargs = {**row.kwargs, "task_type": None, "target_modules": targets}
    if "feedforward_modules" in kwargs and isinstance(targets, list):  # IA3: keep only listed layers
        kwargs["feedforward_modules"] = [m for m in kwargs["feedforward_modules"] if m in targets]
    if not hf:
        return spec.build_config({"target_modules": targets}, **{k: v for k, v in kwargs.items()
                                                                 if k not in ("task_type", "target_modules")})
    import peft

    fields = {k: v for k, v in {**kwargs, **spec.fixed}.items() if v is not None}
    return getattr(peft, spec.config_cls.__name__)(**fields)


def step_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, 1e-5, 0.0) if params else None

    def step() -> None:
        model(x).backward(grad)
        x.grad = None
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run_layer(row: Row, short: str, layer: nn.Module, warmup: int, repeats: int) -> dict[str, Any]:
    from .common import copy_trainable_by_name, perturb_trainable

    floor = OneLayer(short, copy.deepcopy(layer)).requires_grad_(False)
    ours = peft_engine.get_peft_model(OneLayer(short, copy.deepcopy(layer)), adapter_config(row, [short]))
    perturb_trainable(ours)
    import peft

    hf = peft.get_peft_model(OneLayer(short, copy.deepcopy(layer)), adapter_config(row, [short], hf=True))
    if not copy_trainable_by_name(ours, hf):
        peft.set_peft_model_state_dict(hf, peft_engine.get_peft_model_state_dict(ours))
    ours.train()
    hf.train()
    gen = torch.Generator().manual_seed(0)
    n_in, n_out = layer.weight.shape[1], layer.weight.shape[0]
    x = torch.randn(BATCH * SEQ_LEN, n_in, generator=gen, requires_grad=True)
    grad = torch.randn(BATCH * SEQ_LEN, n_out, generator=gen)
    with torch.no_grad():  # the same function: outputs agree to float32 rounding of the layer's scale
        a, b = ours(x), hf(x)
        same = bool((a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6)
    t: Timings = interleaved({"ours": step_fn(ours, x, grad), "hf": step_fn(hf, x, grad),
                              "floor": step_fn(floor, x, grad)}, warmup=warmup, repeats=repeats)
    return {"layer": short, "shape": [n_in, n_out], "outputs_match": same,
            "floor_ms": t.median("floor") * 1e3, "ours_ms": t.median("ours") * 1e3, "hf_ms": t.median("hf") * 1e3,
            "ours_overhead_ms": t.paired_median("ours", "floor") * 1e3,
            "hf_overhead_ms": t.paired_median("hf", "floor") * 1e3, "timings": t.to_json()}


def run_row(model: nn.Module, row: Row, warmup: int, repeats: int) -> dict[str, Any]:
    layers = []
    for short, (layer, count) in sorted(target_layers(model, row).items()):
        result = run_layer(row, short, layer, warmup, repeats)
        result["count"] = count
        layers.append(result)
        print(f"    {short:10s} x{count}: ours {fmt(result['ours_overhead_ms'], '.3f')} ms  "
              f"HF {fmt(result['hf_overhead_ms'], '.3f')} ms over a {fmt(result['floor_ms'], '.2f')} ms floor", flush=True)
    ours = sum(r["ours_overhead_ms"] * r["count"] for r in layers) / 1e3
    hf = sum(r["hf_overhead_ms"] * r["count"] for r in layers) / 1e3
    ratio = ours / hf if hf > 0 else None
    out = {"row": row.name, "method": row.method, "layers": layers, "model_ours_overhead_s": ours,
           "model_hf_overhead_s": hf, "overhead_ratio": ratio,
           "outputs_match": all(r["outputs_match"] for r in layers)}
    if row.overhead_goal:
        out["goal"] = goal(ratio, row.overhead_goal)
    return out


def overhead_parser(prog: str, doc: str, unit: str, warmup: int, repeats: int) -> argparse.ArgumentParser:
    """The command line the per-layer and per-block benchmarks share; ``unit`` names what one is timed on."""
    name = prog.rsplit(".", 1)[-1]
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"], help=f"whose {unit} (default smollm2)")
    p.add_argument("--rows", default=None, help="comma list of engine rows or methods (default: every "
                                                "weight-adapting row)")
    p.add_argument("--warmup", type=int, default=warmup, help=f"untimed rounds per {unit}")
    p.add_argument("--repeats", type=int, default=repeats, help=f"timed rounds per {unit}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable CPUs)")
    p.add_argument("--name", default=None, help=f"results file name under benchmarks/results/ (default {name}, "
                                                f"or {name}_quick with --quick)")
    p.add_argument("--quick", action="store_true", help=f"the tiny model's {unit}, 1 warmup + 5 rounds: checks it runs")
    p.add_argument("--keep-freed-memory", action="store_true", help=KEEP_FREED_HELP)
    return p


def build_parser() -> argparse.ArgumentParser:
    return overhead_parser("benchmarks.layers", __doc__, "layer", warmup=5, repeats=40)


def summary_lines(payload: dict[str, Any]) -> list[str]:
    parts = [f"{r['row']} {fmt(r['overhead_ratio'], '.2f')}x [{mark(r.get('goal'))}]" for r in payload["rows"]]
    return [f"layers [{payload['model']}]: overhead ours/HF per target layer, summed: " + "; ".join(parts)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    threads = set_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.quick:
        args.model, args.warmup, args.repeats = "tiny", 1, 5
    model, label = load_model(args.model)
    rows = [r for r in select_rows(args.rows, args.model) if r.method not in PROMPT_METHODS]
    print(f"layer benchmark: {label}; torch threads {threads}; {args.warmup} warmup + {args.repeats} rounds per layer")
    results = []
    for row in rows:
        print(f"  {row.name} ...", flush=True)
        results.append(run_row(model, row, args.warmup, args.repeats))
    payload = {"model": label, "threads": threads, "batch": [BATCH, SEQ_LEN], "warmup": args.warmup,
               "repeats": args.repeats, "rows": results}
    path = write_json(args.name or ("layers_quick" if args.quick else "layers"), payload, command=command_line("benchmarks.layers", argv))
    table = [{"row": r["row"], "ours": fmt(r["model_ours_overhead_s"]), "hf": fmt(r["model_hf_overhead_s"]),
              "ratio": fmt(r["overhead_ratio"], ".2f"), "goal": mark(r.get("goal")),
              "match": "yes" if r["outputs_match"] else "NO"} for r in results]
    print(f"\nAdapter overhead summed over {label}'s targeted layers (s per training step; paired medians)")
    print(format_table(table, [("row", "row"), ("ours", "ours s"), ("hf", "HF s"), ("ratio", "ours/HF"),
                               ("goal", "overhead goal"), ("match", "outputs match")]))
    print("\n" + "\n".join(summary_lines(payload)))
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
