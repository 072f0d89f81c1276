"""Run every benchmark (`make bench`) and print one combined summary.

    .venv/bin/python -m benchmarks.run_all                  # engine, layers, blocks, bases, packing, sweep (about 40 min on 2 cores)
    .venv/bin/python -m benchmarks.run_all --quick          # tiny models only: checks every script runs
    .venv/bin/python -m benchmarks.run_all --only engine,sweep

Each benchmark writes ``benchmarks/results/<name>.json`` (``<name>_quick.json`` with --quick)
and prints its own table. Goals are reported, not asserted: the exit status is 0 whenever the
benchmarks ran, met or missed, and 1 only when one of them crashed.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from collections.abc import Callable
from typing import Any

from .common import mark

BENCHMARKS = ("engine", "layers", "blocks", "bases", "packing", "sweep")


def _engine_summary(payload: dict[str, Any]) -> list[str]:
    from .engine import summary_lines

    return summary_lines(payload)


def _layers_summary(payload: dict[str, Any]) -> list[str]:
    from .layers import summary_lines

    return summary_lines(payload)


def _blocks_summary(payload: dict[str, Any]) -> list[str]:
    from .blocks import summary_lines

    return summary_lines(payload)


def _sweep_summary(payload: dict[str, Any]) -> list[str]:
    from .sweep import summary_lines

    return summary_lines(payload)


def _packing_summary(payload: dict[str, Any]) -> list[str]:
    return [f"packing: {payload['base']}, {payload['padding_share']:.0%} padding: packed / padded step time "
            f"{payload['ratio']:.3f}, losses within {payload['max_relative_loss_difference']:.1e}"]


def _generic_summary(name: str) -> Callable[[dict[str, Any]], list[str]]:
    """Goals of a benchmark written elsewhere (bases): whatever ``payload["goals"]`` holds."""

    def lines(payload: dict[str, Any]) -> list[str]:
        goals = payload.get("goals") or {}
        parts = [f"{key} {g.get('value', '-') if not isinstance(g.get('value'), float) else round(g['value'], 3)} "
                 f"{g.get('op', '<=')} {g.get('limit')} [{mark(g)}]"
                 for key, g in goals.items() if isinstance(g, dict)]
        return [f"{name}: " + ("; ".join(parts) if parts else "ran (no goals reported)")]

    return lines


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "engine": _engine_summary, "layers": _layers_summary, "blocks": _blocks_summary, "sweep": _sweep_summary, "packing": _packing_summary, "bases": _generic_summary("bases")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--quick", action="store_true", help="each benchmark's --quick mode (tiny models)")
    args = parser.parse_args(argv)
    chosen = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)}; allowed: {', '.join(BENCHMARKS)}")

    summary: list[str] = []
    crashed = []
    started = time.perf_counter()
    for name in chosen:
        print(f"\n===== {name} =====", flush=True)
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ImportError as exc:  # e.g. a benchmark another change has not landed yet
            summary.append(f"{name}: skipped ({exc})")
            continue
        try:
            payload = module.main(["--quick"] if args.quick else [])
            lines = SUMMARIES[name](payload) if isinstance(payload, dict) else [f"{name}: ran"]
        except SystemExit as exc:  # a benchmark's argument check
            lines = [f"{name}: stopped ({exc})"]
            crashed.append(name)
        except Exception:
            traceback.print_exc()
            lines = [f"{name}: CRASHED (traceback above)"]
            crashed.append(name)
        summary.extend(line + f"  [{time.perf_counter() - t0:.0f} s]" for line in lines)

    print("\n===== summary =====")
    print("\n".join(summary))
    print(f"total {time.perf_counter() - started:.0f} s; goals are reported, not asserted")
    return 1 if crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
