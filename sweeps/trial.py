"""One Ray Tune trial: a function that opens the trial's MLflow run and relays its job.

The training itself runs on Ray Train workers of a warm pool (:mod:`sweeps.pool`): this
function submits the trial's job to the sweep's :class:`~sweeps.board.TrialBoard`, then turns
each eval the workers report into ``tune.report(metrics, checkpoint=...)``. The checkpoints
are real Tune checkpoints, so the rest is plain Tune: ASHA stops a trial at a report (the
workers hear "stop" and take the next job), PBT pauses a trial and restarts it from a better
trial's checkpoint, and a retried or resumed trial starts from ``tune.get_checkpoint()``.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from typing import Any

EVENT_POLL_S = 60.0


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs to know about its sweep (passed with ``tune.with_parameters``)."""

    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    storage_path: str  # the pools' Ray Train runs and the staging folder for checkpoints (inside the sweep folder)
    data_dir: str | None = None  # tokenized splits prepared once by the driver


class TrialFailed(RuntimeError):
    """The trial's job failed on its Ray Train workers; the message ends with the worker's error."""


def run_trial(config: dict[str, Any], *, spec: Any, sweep: SweepContext, board: Any) -> None:
    import ray
    import ray.tune

    from .tracking import SweepTracker

    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    params = spec.trial_params(config)
    tracker = SweepTracker(sweep.tracking_uri, sweep.experiment_name)
    run_id = tracker.start_trial(sweep.parent_run_id, sweep.sweep_id, trial_id, params.label(),
                                 {**params.flat(), "trial_name": trial_name})
    restored = ray.tune.get_checkpoint()
    key = f"{trial_id}-{uuid.uuid4().hex[:8]}"
    ray.get(board.submit.remote({"key": key, "trial_id": trial_id, "params": params, "run_id": run_id,
                                 "resume_from": None if restored is None else restored.path}))
    try:
        while True:
            event = ray.get(board.next_event.remote(key, EVENT_POLL_S))
            if event is None:
                continue  # still queued or training between evals
            if event["kind"] == "report":
                _relay(board, key, event)
            elif event["kind"] == "done":
                break
            else:
                raise TrialFailed(f"trial {trial_id} failed on its Ray Train workers:\n{event['message']}")
    except BaseException as exc:  # failed, or SystemExit: Tune stopped the trial inside tune.report
        board.cancel.remote(key)
        if not isinstance(exc, SystemExit):
            tracker.end_run(run_id, "FAILED")
        raise
    latest = ray.tune.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as folder:
            tracker.client.log_artifacts(run_id, folder, artifact_path="adapter")
    tracker.end_run(run_id, "FINISHED")


def _relay(board: Any, key: str, event: dict[str, Any]) -> None:
    """One eval to Tune; Tune copies the staged checkpoint into the trial's folder."""
    import ray.tune

    staged = event["checkpoint"]
    try:
        checkpoint = None if staged is None else ray.tune.Checkpoint.from_directory(staged)
        ray.tune.report(event["metrics"], checkpoint=checkpoint)  # raises SystemExit when Tune stops the trial
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    persisted = ray.tune.get_checkpoint() if staged is not None else None
    board.decide.remote(key, {"stop": False, "checkpoint": None if persisted is None else persisted.path})
