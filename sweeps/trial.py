"""One Ray Tune trial: a function that opens the trial's MLflow run and fits a TorchTrainer.

Ray 2.60 runs Train V2: the Tune trial is only the driver of a Ray Train run. Its workers
(``ScalingConfig`` from the space) run :func:`sweeps.worker.train_loop_per_worker`, and
``TuneReportCallback`` forwards each eval's metrics to Tune, where ASHA may stop the trial.
The Train run is named after the Tune trial id, so a retried trial or a resumed sweep finds
the run's checkpoints under the same storage path and continues from the latest one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs to know about its sweep (passed with ``tune.with_parameters``)."""

    sweep_id: str
    parent_run_id: str
    tracking_uri: str
    experiment_name: str
    storage_path: str  # where the trials' Ray Train runs keep their checkpoints (inside the sweep folder)
    data_dir: str | None = None  # tokenized splits prepared once by the driver


# Ray Train's controller polls its workers every 2 s by default, which a trial pays at start-up
# and again at the end. TorchTrainer.fit() hands RAY_TRAIN_* variables of the calling process
# (this trial) on to the controller and workers, so this reaches them on any cluster.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def run_trial(config: dict[str, Any], *, spec: Any, sweep: SweepContext) -> None:
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # an operator's own setting wins
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from .tracking import SweepTracker
    from .worker import train_loop_per_worker

    context = ray.tune.get_context()
    trial_id, trial_name = context.get_trial_id(), context.get_trial_name()
    params = spec.trial_params(config)
    tracker = SweepTracker(sweep.tracking_uri, sweep.experiment_name)
    run_id = tracker.start_trial(sweep.parent_run_id, sweep.sweep_id, trial_id, params.label(),
                                 {**params.flat(), "trial_name": trial_name})
    resources = spec.resources
    scaling = ray.train.ScalingConfig(
        num_workers=resources.workers,
        use_gpu=resources.gpus_per_worker > 0,
        resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec, "params": params, "run_id": run_id, "tracking_uri": sweep.tracking_uri,
                           "data_dir": sweep.data_dir},
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=trial_id,
            storage_path=sweep.storage_path,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=resources.worker_max_failures),
            # Keep the two best by the sweep's metric (Train keeps the latest as well, for resuming):
            # the registry needs the best eval's adapter, which is not always among the last two.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=spec.search.metric,
                                                         checkpoint_score_order=spec.search.mode),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        tracker.end_run(run_id, "FAILED")
        raise
    _report_if_silent(result)
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as folder:
            tracker.client.log_artifacts(run_id, folder, artifact_path="adapter")
    tracker.end_run(run_id, "FINISHED")


def _report_if_silent(result: Any) -> None:
    """Give Tune the final metrics when this trial session saw none.

    A trial restarted after its Train run had already finished (the driver died after the
    run ended but before Tune saved that) gets its result back from Train at once, with no
    new reports; Tune would then reject the trial for lacking the sweep's metric.
    """
    import ray.tune
    from ray.train._internal.session import get_session  # Tune's per-trial session (no public accessor)

    session = get_session()
    if session is None or getattr(session, "iteration", 1) > 0 or not result.metrics:
        return
    metrics = dict(result.metrics)
    if result.checkpoint is not None:
        metrics["checkpoint_path"] = result.checkpoint.path
    ray.tune.report(metrics)
