"""After the trials: the winner, the summary table, and each trial run's final MLflow status.

Tune knows how every trial ended (finished, stopped early by ASHA, failed); a trial actor
that Tune stops cannot close its own MLflow run, so the driver does it here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class TrialOutcome:
    trial_id: str
    label: str
    method: str
    status: str  # finished | stopped | failed
    best: float | None
    best_step: int | None
    checkpoint: str | None
    error: str | None


@dataclass
class Winner:
    trial_id: str
    label: str
    method: str
    metric: str
    value: float
    checkpoint: str
    params: dict[str, Any]


def _better(a: float, b: float, mode: str) -> bool:
    return a < b if mode == "min" else a > b


def outcomes(spec: Any, results: Any) -> list[TrialOutcome]:
    metric, mode = spec.search.metric, spec.search.mode
    rows = []
    for result in results:
        config = result.config or {}
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id(result)
        try:
            params = spec.trial_params(config)
            label, method = params.label(), params.method
        except Exception:  # a trial that failed before sampling completed
            label, method = "?", "?"
        best = best_step = None
        frame = result.metrics_dataframe
        if frame is not None and metric in frame:
            frame = frame.dropna(subset=[metric])
            if len(frame):
                row = frame.loc[frame[metric].idxmin() if mode == "min" else frame[metric].idxmax()]
                best = float(row[metric])
                best_step = int(row["step"]) if "step" in row and not math.isnan(row["step"]) else None
        kept = _best_checkpoint(result, metric, mode)
        checkpoint = None
        if kept is not None:  # what can be registered: the best eval whose checkpoint Tune kept
            checkpoint, best = kept[0], kept[1]
            best_step = kept[2] if kept[2] is not None else best_step
        if result.error is not None:
            status = "failed"
        elif best_step is not None and spec.train.max_steps and _last_step(result) < spec.train.max_steps:
            status = "stopped"
        else:
            status = "finished"
        rows.append(TrialOutcome(trial_id, label, method, status, best, best_step, checkpoint,
                                 None if result.error is None else _short(result.error)))
    return rows


def _best_checkpoint(result: Any, metric: str, mode: str) -> tuple[str, float, int | None] | None:
    """The best of the checkpoints Tune kept for this trial: (path, metric value, step)."""
    best = None
    for checkpoint, metrics in getattr(result, "best_checkpoints", None) or []:
        value = (metrics or {}).get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            continue
        if best is None or _better(value, best[1], mode):
            step = (metrics or {}).get("step")
            best = (checkpoint.path, float(value), int(step) if isinstance(step, (int, float)) else None)
    return best


def _trial_id(result: Any) -> str:
    """Tune's trial id, from the metrics or (for a trial that never reported) its folder name."""
    path = str(getattr(result, "path", "") or "").rstrip("/").split("/")[-1]
    found = re.search(r"_([0-9a-f]{5}_\d{5})(?:_|$)", path)
    return found.group(1) if found else path


def _last_step(result: Any) -> int:
    return int((result.metrics or {}).get("step", 0) or 0)


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:200]


def pick_winner(spec: Any, results: Any) -> Winner | None:
    best: TrialOutcome | None = None
    for row in outcomes(spec, results):
        if row.best is None or row.checkpoint is None:
            continue
        if best is None or _better(row.best, best.best, spec.search.mode):
            best = row
    if best is None:
        return None
    config = next((r.config for r in results if _matches(r, best.trial_id)), {})
    return Winner(best.trial_id, best.label, best.method, spec.search.metric, best.best, best.checkpoint,
                  spec.trial_params(config).flat())


def _matches(result: Any, trial_id: str) -> bool:
    return (result.metrics or {}).get("trial_id") == trial_id or _trial_id(result) == trial_id


def summarise(spec: Any, results: Any) -> str:
    """A table of the best trial per method, then every failure."""
    rows = outcomes(spec, results)
    metric, mode = spec.search.metric, spec.search.mode
    per_method: dict[str, TrialOutcome] = {}
    for row in rows:
        if row.best is None:
            continue
        current = per_method.get(row.method)
        if current is None or _better(row.best, current.best, mode):
            per_method[row.method] = row
    counts = {s: sum(r.status == s for r in rows) for s in ("finished", "stopped", "failed")}
    lines = [f"{len(rows)} trials: {counts['finished']} finished, {counts['stopped']} stopped early, "
             f"{counts['failed']} failed", "", f"best trial per method ({metric}, {mode}):",
             f"  {'method':<16} {metric:>12} {'step':>6}  trial"]
    for method, row in sorted(per_method.items(), key=lambda kv: kv[1].best if mode == "min" else -kv[1].best):
        lines.append(f"  {method:<16} {row.best:>12.4f} {row.best_step or 0:>6}  {row.label}")
    for row in rows:
        if row.status == "failed":
            lines.append(f"  FAILED {row.label}: {row.error}")
    return "\n".join(lines)


def update_trial_runs(tracker: Any, context: Any, spec: Any, results: Any) -> None:
    """Close every trial's MLflow run with the status Tune saw, and log its best metric."""
    from .tracking import SWEEP_TAG, TRIAL_TAG

    for row in outcomes(spec, results):
        run_id = tracker.find_run(**{SWEEP_TAG: context.sweep_id, TRIAL_TAG: row.trial_id})
        if run_id is None:
            continue
        tracker.client.set_tag(run_id, "peft_sweeps.outcome", row.status)
        if row.error:
            tracker.client.set_tag(run_id, "peft_sweeps.error", row.error)
        if row.best is not None:
            tracker.client.log_metric(run_id, f"best_{spec.search.metric}", row.best)
        tracker.client.set_terminated(run_id, status="FAILED" if row.status == "failed" else "FINISHED")
