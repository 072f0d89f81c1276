"""MLflow tracking: one parent run per sweep, one child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids — no global "active run" —
because the parent lives in the driver, children are opened by Tune trial actors and
written by Ray Train workers, possibly on other nodes. Runs are found again by tags
(``peft_sweeps.sweep_id``, ``peft_sweeps.trial_id``), so a resumed sweep or a retried trial
continues its own run instead of creating a duplicate.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

SWEEP_TAG = "peft_sweeps.sweep_id"
TRIAL_TAG = "peft_sweeps.trial_id"
PARENT_TAG = "mlflow.parentRunId"
PACKAGES = ("torch", "transformers", "datasets", "bitsandbytes", "ray", "mlflow", "safetensors", "peft-sweeps")


def _client(tracking_uri: str) -> MlflowClient:
    """An MLflow client; MLflow is imported here, on first use: the driver resolves its URI and
    starts Ray before it pays ~2 s for the import."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI: argument > MLFLOW_TRACKING_URI > SQLite file in the working directory.

    Relative SQLite paths are made absolute: trials run in other processes and directories.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def _artifact_root(uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts (next to the database, absolute)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent.joinpath("mlartifacts").as_uri()
    return None


class SweepTracker:
    """The driver's view: experiment, parent run, trial runs."""

    def __init__(self, tracking_uri: str, experiment_name: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        experiment = self.client.get_experiment_by_name(experiment_name)
        if experiment is None:
            self.experiment_id = self.client.create_experiment(experiment_name, artifact_location=_artifact_root(tracking_uri))
        else:
            self.experiment_id = experiment.experiment_id

    def find_run(self, **tags: str) -> str | None:
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def start_sweep(self, sweep_id: str, *, name: str, params: Mapping[str, Any], space_file: str | None,
                    tags: Mapping[str, str] | None = None) -> str:
        """The sweep's parent run (found again by sweep id on resume)."""
        existing = self.find_run(**{SWEEP_TAG: sweep_id, "peft_sweeps.kind": "sweep"})
        if existing:
            self.client.update_run(existing, status="RUNNING")
            self._log_missing_params(existing, params)
            return existing
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            SWEEP_TAG: sweep_id, "peft_sweeps.kind": "sweep", "git_commit": git_commit(), **(tags or {})})
        run_id = run.info.run_id
        self._log_params(run_id, params)
        if space_file:
            self.client.log_artifact(run_id, space_file)
        self.client.log_dict(run_id, environment(), "environment.json")
        return run_id

    def start_trial(self, parent_run_id: str, sweep_id: str, trial_id: str, trial_name: str,
                    params: Mapping[str, Any]) -> str:
        """The trial's child run; a retried or resumed trial gets its existing run back."""
        existing = self.find_run(**{SWEEP_TAG: sweep_id, TRIAL_TAG: trial_id})
        if existing:
            self.client.update_run(existing, status="RUNNING")
            self._log_missing_params(existing, params)
            return existing
        run = self.client.create_run(self.experiment_id, run_name=trial_name, tags={
            PARENT_TAG: parent_run_id, SWEEP_TAG: sweep_id, TRIAL_TAG: trial_id, "peft_sweeps.kind": "trial"})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, _param(v)) for k, v in params.items()])

    def _log_missing_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params a found-again run lacks: a driver killed between ``create_run`` and logging them
        left the run without them (MLflow has no atomic create-with-params)."""
        logged = self.client.get_run(run_id).data.params
        missing = {k: v for k, v in params.items() if k not in logged}
        if missing:
            self._log_params(run_id, missing)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def trial_runs(self, parent_run_id: str) -> list:
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
                                       max_results=1000)


class TrialLogger:
    """What a Ray Train worker (rank 0) writes into its trial's run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = _client(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if _is_number(v)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def close(self) -> None:
        """Nothing buffered: log_batch is synchronous."""


def warm_tracking_store(tracking_uri: str) -> None:
    """Import MLflow and open the tracking store once (a SQLite engine, an HTTP session), so a
    worker's first metric of its first trial does not wait for either (~3.5 s on 2 cores)."""
    _client(tracking_uri).search_experiments(max_results=1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # drop NaN


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text[:6000]


def git_commit() -> str:
    """The commit of the code that runs (``ray job submit`` copies the tree without .git: use the env)."""
    if os.environ.get("PEFT_SWEEPS_GIT_COMMIT"):
        return os.environ["PEFT_SWEEPS_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(), "packages": package_versions()}
