"""Adapter overhead per decoder block: peft_engine vs HF PEFT on one whole block of the model.

    .venv/bin/python -m benchmarks.blocks                           # every engine row, SmolLM2's block 0
    .venv/bin/python -m benchmarks.blocks --rows lora-r16-attn --repeats 200

Why: ``benchmarks.layers`` times each target layer alone, so it cannot see what happens between
sibling layers: LoRA computes siblings that read one input (q/k/v, gate/up) together
(``peft_engine/tuners/lora/shared_input.py``), which also saves autograd's sums of their input
gradients. The whole-model ``benchmarks.engine`` sees it, but its floor drifts by +-0.1 s per
round, as much as a rank-16 adapter's whole overhead. Here the model's first decoder block
(norms, attention, MLP, real weights) is wrapped by both engines with identical adapter weights,
and one training step of it (forward, backward to the block's input and the adapters, fused
AdamW) is timed next to the frozen block's (forward, backward to the input), interleaved, over
many rounds; for LoRA also with its siblings run one by one (``ours_alone``), which
shows what sharing their input saves. The overhead of a block is the median of the paired differences; the model's is
that times the number of blocks. Batch 4 x 128 tokens, as the engine benchmark. Llama-family
models only (the block is called with its rotary embeddings and a causal mask of its own).
Results: benchmarks/results/blocks.json.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

import peft_engine
from peft_engine.tuners.lora.shared_input import groups_in

from .common import (
    Timings,
    command_line,
    copy_trainable_by_name,
    fmt,
    format_table,
    goal,
    interleaved,
    keep_freed_memory,
    mark,
    perturb_trainable,
    set_threads,
    write_json,
)
from .engine import (
    BATCH,
    PROMPT_METHODS,
    SEQ_LEN,
    Row,
    format_interval,
    load_model,
    overhead_ratio_of,
    select_rows,
)
from .layers import adapter_config, overhead_parser, step_fn


class OneBlock(nn.Module):
    """One decoder block under ``layers.0`` (so layer-indexed target names still match), fed its rotary embeddings."""

    def __init__(self, block: nn.Module, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([block])
        self.position_embeddings = position_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x, position_embeddings=self.position_embeddings)


def first_block(model: nn.Module) -> tuple[OneBlock, int]:
    """A copy of block 0 with what it needs to run alone, and how many blocks the model has."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.model
    positions = torch.arange(SEQ_LEN).unsqueeze(0).expand(BATCH, -1)
    probe = torch.zeros(BATCH, SEQ_LEN, inner.config.hidden_size)
    with torch.no_grad():
        rope = decoder.rotary_emb(probe, positions)
    return OneBlock(copy.deepcopy(decoder.layers[0]), rope), len(decoder.layers)


def run_row(block: OneBlock, count: int, row: Row, warmup: int, repeats: int) -> dict[str, Any]:
    targets = row.targets if isinstance(row.targets, str) else list(row.targets)
    floor = copy.deepcopy(block).requires_grad_(False)
    ours = peft_engine.get_peft_model(copy.deepcopy(block), adapter_config(row, targets))
    perturb_trainable(ours)
    import peft

    hf = peft.get_peft_model(copy.deepcopy(block), adapter_config(row, targets, hf=True))
    if not copy_trainable_by_name(ours, hf):
        peft.set_peft_model_state_dict(hf, peft_engine.get_peft_model_state_dict(ours))
    gen = torch.Generator().manual_seed(0)
    hidden = block.layers[0].input_layernorm.weight.shape[0]
    x = torch.randn(BATCH, SEQ_LEN, hidden, generator=gen, requires_grad=True)
    grad = torch.randn(BATCH, SEQ_LEN, hidden, generator=gen)
    for m in (ours, hf, floor):
        m.train()  # methods train differently from how they infer; Llama blocks have no dropout at 0.0
    fns = {"ours": step_fn(ours, x, grad), "hf": step_fn(hf, x, grad), "floor": step_fn(floor, x, grad)}
    groups = groups_in(ours) if row.method == "lora" else []  # DoRA's siblings run one by one anyway
    if groups:  # the same adapter with its siblings run one by one: what sharing their input saves
        alone = copy.deepcopy(ours)
        for group in groups_in(alone):
            group.enabled = False
        fns["ours_alone"] = step_fn(alone, x, grad)
    with torch.no_grad():
        a, b = ours(x), hf(x)
        same = bool((a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6)
    t: Timings = interleaved(fns, warmup=warmup, repeats=repeats)
    ours_s, hf_s = t.paired_median("ours", "floor") * count, t.paired_median("hf", "floor") * count
    ratio = ours_s / hf_s if hf_s > 0 else None
    interval = t.interval(overhead_ratio_of)
    out = {"row": row.name, "method": row.method, "blocks": count, "outputs_match": same,
           "floor_ms": t.median("floor") * 1e3, "ours_ms": t.median("ours") * 1e3, "hf_ms": t.median("hf") * 1e3,
           "model_ours_overhead_s": ours_s, "model_hf_overhead_s": hf_s, "overhead_ratio": ratio,
           "overhead_ratio_interval": interval, "shared_input_groups": len(groups), "timings": t.to_json()}
    if groups:
        out["model_ours_alone_overhead_s"] = t.paired_median("ours_alone", "floor") * count
    if row.overhead_goal:
        out["goal"] = goal(ratio, row.overhead_goal)
    return out


def build_parser() -> argparse.ArgumentParser:
    return overhead_parser("benchmarks.blocks", __doc__, "block", warmup=10, repeats=100)


def summary_lines(payload: dict[str, Any]) -> list[str]:
    parts = [f"{r['row']} {fmt(r['overhead_ratio'], '.2f')}x [{mark(r.get('goal'))}]" for r in payload["rows"]]
    return [f"blocks [{payload['model']}]: overhead ours/HF per decoder block: " + "; ".join(parts)]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    threads = set_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.quick:
        args.model, args.warmup, args.repeats = "tiny", 1, 5
    model, label = load_model(args.model)
    block, count = first_block(model)
    del model
    rows = [r for r in select_rows(args.rows, args.model) if r.method not in PROMPT_METHODS]
    print(f"block benchmark: {label} block 0 (x{count}); torch threads {threads}; "
          f"{args.warmup} warmup + {args.repeats} rounds per row")
    results = []
    for row in rows:
        result = run_row(block, count, row, args.warmup, args.repeats)
        results.append(result)
        alone = (f"  (siblings one by one: {fmt(result['model_ours_alone_overhead_s'])} s)"
                 if "model_ours_alone_overhead_s" in result else "")
        print(f"  {row.name:22s} ours {fmt(result['model_ours_overhead_s'])} s  HF {fmt(result['model_hf_overhead_s'])} s"
              f"  ratio {fmt(result['overhead_ratio'], '.2f')}  block floor {fmt(result['floor_ms'], '.1f')} ms{alone}",
              flush=True)
    payload = {"model": label, "threads": threads, "batch": [BATCH, SEQ_LEN], "warmup": args.warmup,
               "repeats": args.repeats, "rows": results}
    path = write_json(args.name or ("blocks_quick" if args.quick else "blocks"), payload,
                      command=command_line("benchmarks.blocks", argv))
    table = [{"row": r["row"], "ours": fmt(r["model_ours_overhead_s"]), "hf": fmt(r["model_hf_overhead_s"]),
              "ratio": fmt(r["overhead_ratio"], ".2f"), "interval": format_interval(r["overhead_ratio_interval"]),
              "goal": mark(r.get("goal")), "alone": fmt(r.get("model_ours_alone_overhead_s")),
              "match": "yes" if r["outputs_match"] else "NO"} for r in results]
    print(f"\nAdapter overhead per training step over {label}'s {count} blocks (s; paired medians of block 0 x {count})")
    print(format_table(table, [("row", "row"), ("ours", "ours s"), ("hf", "HF s"), ("ratio", "ours/HF"),
                               ("interval", "90% interval"), ("goal", "overhead goal"), ("alone", "ours, siblings one by one s"),
                               ("match", "outputs match")]))
    print("\n" + "\n".join(summary_lines(payload)))
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
