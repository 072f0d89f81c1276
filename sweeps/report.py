"""The sweep report: a markdown summary and PNG plots, logged to the sweep's MLflow run.

Three plots answer the questions a nightly reader has: did the winner beat the champion
(per metric), how did the best trial of each method learn (eval metric over steps), and
how does the metric move with the adapter's size (rank, virtual tokens, ...).
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: Ray workers and CI have no display
import matplotlib.pyplot as plt  # noqa: E402


def trial_histories(client: Any, runs: list, metric: str) -> dict[str, list[tuple[int, float]]]:
    return {run.info.run_id: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]
            for run in runs}


def plot_winner_vs_champion(outcome: Any, path: Path) -> Path | None:
    metrics = sorted(k for k in outcome.candidate if k in outcome.champion and not k.startswith("eval_") or k == "eval_loss")
    metrics = [m for m in metrics if m in outcome.champion]
    if not metrics:
        return None
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3), squeeze=False)
    for ax, name in zip(axes[0], metrics):
        ax.bar(["candidate", "champion"], [outcome.candidate[name], outcome.champion[name]], color=["tab:blue", "tab:gray"])
        ax.set_title(name)
    fig.suptitle(f"version {outcome.version} vs champion version {outcome.champion_version}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_best_curves(runs: list, histories: dict, metric: str, mode: str, path: Path) -> Path | None:
    best: dict[str, tuple[float, Any]] = {}
    for run in runs:
        points = histories.get(run.info.run_id) or []
        if not points:
            continue
        score = min(v for _, v in points) if mode == "min" else max(v for _, v in points)
        method = run.data.params.get("method", "?")
        if method not in best or (score < best[method][0] if mode == "min" else score > best[method][0]):
            best[method] = (score, run)
    if not best:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, (_, run) in sorted(best.items()):
        points = sorted(histories[run.info.run_id])
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=f"{method}: {run.info.run_name}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"best trial per method ({metric})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_metric_vs_size(runs: list, metric: str, path: Path) -> Path | None:
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for run in runs:
        size = _size(run.data.params)
        value = run.data.metrics.get(f"best_{metric}", run.data.metrics.get(metric))
        if size is not None and value is not None:
            by_method[run.data.params.get("method", "?")].append((size, value))
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in sorted(by_method.items()):
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rank / size")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs adapter size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _size(params: dict[str, str]) -> float | None:
    for key in ("r", "num_virtual_tokens", "block_size", "adapter_len"):
        if key in params:
            try:
                return float(params[key])
            except ValueError:
                return None
    return None


def log_report(tracker: Any, context: Any, spec: Any, summary: str, outcome: Any | None) -> list[str]:
    """Write the report and plots into the sweep's parent run under ``report/``; return file names."""
    client = tracker.client
    runs = [r for r in tracker.trial_runs(context.parent_run_id)]
    metric, mode = spec.search.metric, spec.search.mode
    histories = trial_histories(client, runs, metric)
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        made = [p for p in (
            plot_winner_vs_champion(outcome, out / "winner_vs_champion.png") if outcome and outcome.champion else None,
            plot_best_curves(runs, histories, metric, mode, out / "best_curve_per_method.png"),
            plot_metric_vs_size(runs, metric, out / "metric_vs_rank.png"),
        ) if p is not None]
        lines = [f"# Sweep {context.sweep_id}", "", "```", summary, "```", ""]
        if outcome is not None:
            lines += ["## Registry", "", outcome.describe(), ""]
        lines += [f"![{p.stem}]({p.name})" for p in made]
        (out / "report.md").write_text("\n".join(lines) + "\n")
        client.log_artifacts(context.parent_run_id, folder, artifact_path="report")
        return ["report.md"] + [p.name for p in made]
