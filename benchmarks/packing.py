"""What padding-free batches are worth on real data: padded vs packed training steps, side by side.

    .venv/bin/python -m benchmarks.packing            # SmolLM2-135M-Instruct, packaged Q/A pairs (~3 min)
    .venv/bin/python -m benchmarks.packing --quick    # tiny-random-llama: checks the script runs

The same model (LoRA r=16 on q/k/v/o), the same optimizer and the same training batches of the
quickstart's data (shuffled as a trial shuffles them, batch 4, 128 tokens at most): each round
runs every batch once through ``TrainingLoss(padding_free=False)`` and once through
``TrainingLoss(padding_free=True)``, alternating which goes first, and checks both give the same
loss. Reported: the summed step time of each side (median over rounds) and the share of padding
in the batches. Results: ``benchmarks/results/packing.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .common import command_line, fmt, format_table, median, set_threads, write_json

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batches(base: str, count: int, batch_size: int, seq_len: int) -> list[dict[str, Any]]:
    from peft_engine.base_specs import load_tokenizer, resolve_base
    from sweeps.data import build_for_spec, make_loader
    from sweeps.space import load_space

    spec = load_space(ROOT / "search_spaces" / "quickstart.yaml")
    spec.data.seq_len = seq_len
    splits = build_for_spec(spec, load_tokenizer(resolve_base(base).path))
    loader = make_loader(splits.train, batch_size, shuffle=True, seed=spec.search.seed, pad_token_id=splits.pad_token_id)
    return [batch for _, batch in zip(range(count), loader)]


def _step(loss_module: Any, optimizer: Any, batch: dict[str, Any]) -> float:
    loss = loss_module(**batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def run(base: str, *, batches: int, rounds: int, batch_size: int, seq_len: int) -> dict[str, Any]:
    import torch

    import peft_engine as pe
    from peft_engine.bases import load_base
    from sweeps.loss import TrainingLoss

    data = _batches(base, batches, batch_size, seq_len)
    torch.manual_seed(0)
    model, _ = load_base(base, task="causal_lm", dtype="float32")
    model = pe.get_peft_model(model, pe.LoraConfig(r=16, lora_alpha=16, target_modules=ATTENTION,
                                                   init_lora_weights="gaussian"))
    model.train()
    # lr=0: both sides see the same weights all along, so their losses must agree batch by batch.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    sides = {"padded": TrainingLoss(model, padding_free=False), "packed": TrainingLoss(model, padding_free=True)}
    if sides["packed"].plan is None or sides["packed"].plan.packing is None:
        raise RuntimeError(f"{base}: the probe refused padding-free batches; nothing to compare")
    for batch in data[:2]:  # warm-up
        for side in sides.values():
            _step(side, optimizer, batch)
    totals: dict[str, list[float]] = {name: [] for name in sides}
    worst = 0.0
    for r in range(rounds):
        spent = dict.fromkeys(sides, 0.0)
        for i, batch in enumerate(data):
            order = list(sides) if (r + i) % 2 == 0 else list(reversed(sides))
            losses = {}
            for name in order:
                started = time.perf_counter()
                losses[name] = _step(sides[name], optimizer, batch)
                spent[name] += time.perf_counter() - started
            worst = max(worst, abs(losses["packed"] - losses["padded"]) / max(abs(losses["padded"]), 1e-12))
        for name, seconds in spent.items():
            totals[name].append(seconds)
    real = sum(int(b["attention_mask"].sum()) for b in data)
    padded_tokens = sum(b["input_ids"].numel() for b in data)
    packed_s, padded_s = median(totals["packed"]), median(totals["padded"])
    return {"base": base, "batches": len(data), "rounds": rounds, "batch_size": batch_size, "seq_len": seq_len,
            "real_tokens": real, "padded_tokens": padded_tokens, "padding_share": 1 - real / padded_tokens,
            "padded_s": padded_s, "packed_s": packed_s, "ratio": packed_s / padded_s, "rounds_s": totals,
            "max_relative_loss_difference": worst}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--batches", type=int, default=20, help="training batches per round (a trial's 20 steps)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="tiny-random-llama, 4 batches, 1 round")
    parser.add_argument("--name", default=None, help="results file name (default packing, or packing_quick)")
    args = parser.parse_args(argv)
    set_threads()
    if args.quick:
        args.base, args.batches, args.rounds = "tiny-random-llama", 4, 1
    result = run(args.base, batches=args.batches, rounds=args.rounds, batch_size=args.batch_size,
                 seq_len=args.seq_len)
    print(format_table([{
        "base": result["base"], "padding": f"{result['padding_share']:.0%}",
        "padded_s": fmt(result["padded_s"]), "packed_s": fmt(result["packed_s"]), "ratio": fmt(result["ratio"]),
        "loss_diff": f"{result['max_relative_loss_difference']:.1e}",
    }], [("base", "base"), ("padding", "padding share"), ("padded_s", f"padded s / {result['batches']} steps"),
         ("packed_s", "packed s"), ("ratio", "packed / padded"), ("loss_diff", "max rel. loss diff")]))
    name = args.name or ("packing_quick" if args.quick else "packing")
    path = write_json(name, {"quick": args.quick, **result}, command=command_line("benchmarks.packing", argv))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
