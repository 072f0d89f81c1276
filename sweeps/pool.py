"""Warm Ray Train worker pools: long-lived Train runs whose workers take one trial after another.

A Ray Train run costs 12-18 s to start (controller, placement group, worker actors, imports)
and seconds to end; a sweep of short trials would pay that for every trial. So the driver
starts one pool per concurrent trial: a ``TorchTrainer`` (``ScalingConfig`` from the space,
DDP over gloo or NCCL, ``FailureConfig`` restarts of lost workers) whose
:func:`pool_loop_per_worker` takes trial jobs from the :class:`~sweeps.board.TrialBoard`
until the sweep is over. Each job loads the base from the model cache (memory-mapped), applies
its adapter and trains (:mod:`sweeps.worker`); nothing of a job outlives it in the worker. The
base for the first job is loaded as soon as the pool starts, while the first trial starts.

A pool whose Train run fails (a lost node, a crashed worker) gives its unfinished job back to
the board, which hands it to the next free pool to resume from its latest Tune checkpoint (up
to ``resources.worker_max_failures`` times; then the trial fails and Tune may retry it), and
the pool starts afresh, unless it keeps failing before finishing any job.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import ray

from .board import STOP

logger = logging.getLogger(__name__)

TAKE_TIMEOUT_S = 5.0  # how long a worker waits on the board before checking again
DECISION_TIMEOUT_S = 3600.0  # a trial that does not answer a report within this is treated as stopped
MAX_FRESH_STARTS = 3  # pool Train runs that may fail in a row without finishing a job
# Ray Train's own settings are left at their defaults: a RAY_TRAIN_* variable in this process
# (a faster health check, say) travels to the controller and workers as a runtime env, which
# costs them Ray's pre-started worker processes; measured with a 0.5 s health check, a
# four-trial sweep took 4-5 s longer on 2 cores.


class WorkerPools:
    """The driver's side: one thread per pool, each fitting that pool's ``TorchTrainer``."""

    def __init__(self, spec: Any, board: Any, *, count: int, storage_path: str, data_dir: str,
                 tracking_uri: str) -> None:
        self.spec, self.board, self.count = spec, board, count
        self.storage_path, self.data_dir, self.tracking_uri = storage_path, data_dir, tracking_uri
        self._threads: list[threading.Thread] = []
        self._stamp = time.strftime("%Y%m%d-%H%M%S")

    def start(self) -> None:
        # Ray Train and Tune share internals with import cycles; a pool thread importing them while
        # the driver's main thread does can see a partially initialised module ("cannot import name
        # '_CheckpointManager' ... most likely due to a circular import"), which failed a pool's
        # first Train run. So both are imported here, once, before any pool thread starts.
        import ray.train.torch  # noqa: F401
        import ray.tune  # noqa: F401

        for index in range(self.count):
            thread = threading.Thread(target=self._run, args=(f"pool-{index}",), daemon=True, name=f"pool-{index}")
            thread.start()
            self._threads.append(thread)

    def close(self, timeout_s: float = 120.0) -> list[str]:
        """End the pools: idle workers return, and each Train run finishes normally.

        A pool whose workers are still starting is waited for too: it takes the board's close
        as its first job and ends. Left running, its thread would wake inside Ray while the
        driver shuts Ray down, and Ray then ends the driver with exit code 1 (seen when a resumed
        sweep had no trial left to run). Only when the cluster cannot hold every pool at once
        (more concurrent trials than it has resources for) are pools that never started left
        to end with this driver, which owns their Train runs. Returns the pools left running.
        """
        ray.get(self.board.close.remote())
        started = ray.get(self.board.started_pools.remote())
        wait_for_all = self._cluster_holds_every_pool()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            if wait_for_all or thread.name in started:
                thread.join(max(0.0, deadline - time.monotonic()))
        return [thread.name for thread in self._threads if thread.is_alive()]

    def _cluster_holds_every_pool(self) -> bool:
        r = self.spec.resources
        total = ray.cluster_resources()
        return (self.count * r.workers * r.cpus_per_worker <= total.get("CPU", 0)
                and self.count * r.workers * r.gpus_per_worker <= total.get("GPU", 0))

    def _run(self, pool_id: str) -> None:
        failures = 0
        attempt = 0
        while not ray.get(self.board.closed.remote()):
            attempt += 1
            finished_before = ray.get(self.board.finished_jobs.remote(pool_id))
            try:
                self._trainer(pool_id, attempt).fit()
                return
            except Exception as exc:  # the Train run failed for good: its job fails, the pool restarts
                message = f"the trial's Ray Train run failed: {_last_line(exc)}"
                logger.warning("%s: %s", pool_id, message)
                ray.get(self.board.pool_failed.remote(pool_id, message))
            progressed = ray.get(self.board.finished_jobs.remote(pool_id)) > finished_before
            failures = 0 if progressed else failures + 1
            if failures >= MAX_FRESH_STARTS:
                ray.get(self.board.pool_gone.remote(pool_id, f"{pool_id} failed {failures} times in a row"))
                return

    def _trainer(self, pool_id: str, attempt: int) -> Any:
        import ray.train
        from ray.train.torch import TorchTrainer

        resources = self.spec.resources
        return TorchTrainer(
            pool_loop_per_worker,
            train_loop_config={"board": self.board, "pool_id": pool_id, "spec": self.spec,
                               "data_dir": self.data_dir, "tracking_uri": self.tracking_uri,
                               "staging": str(Path(self.storage_path) / "staging")},
            scaling_config=ray.train.ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker={"CPU": resources.cpus_per_worker, "GPU": resources.gpus_per_worker},
            ),
            run_config=ray.train.RunConfig(
                name=f"{pool_id}-{self._stamp}-{attempt}",
                storage_path=self.storage_path,
                # No in-place restart: a restarted group would wait for the very resources a lost
                # node took away. The board hands the job to the next free pool instead (up to
                # resources.worker_max_failures times) and this pool starts afresh.
                failure_config=ray.train.FailureConfig(max_failures=0),
            ),
        )


def pool_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``: take jobs from the board until it closes."""
    import datasets
    import ray.train
    import ray.train.torch
    import torch

    from .data import load_splits

    datasets.disable_progress_bars()
    board, pool_id, spec = config["board"], config["pool_id"], config["spec"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    splits = None  # tokenized once by the driver while the pools start; memory-mapped at the first job
    if rank == 0:
        ray.get(board.started.remote(pool_id))
    warm = _warm_up(spec, device, config["tracking_uri"] if rank == 0 else None)
    while True:
        job = ray.get(board.take.remote(pool_id, TAKE_TIMEOUT_S)) if rank == 0 else None
        job = _broadcast(job, world)
        if job is None:
            continue
        if job.get("close"):
            return
        if splits is None:
            splits = load_splits(config["data_dir"])
        _run_job(job, spec, splits, config, board, pool_id, rank, world, device, warm)
        warm = None  # taken by the job, or not the base it needed: each later job loads its own
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _warm_up(spec: Any, device: Any, tracking_uri: str | None) -> Any:
    """While the sweep's first trial starts: load the pool's first base and open the tracking
    store (rank 0 logs). Returns the base, or None if loading failed: the job then loads its
    own and reports the error where it belongs."""
    from .tracking import warm_tracking_store
    from .worker import warm_base

    try:
        warm = warm_base(spec, device)
    except Exception as exc:
        logger.warning("pre-loading the base failed; the first job loads its own: %s", _last_line(exc))
        warm = None
    if tracking_uri is not None:
        try:
            warm_tracking_store(tracking_uri)
        except Exception as exc:  # the trial's own logging will say what is wrong
            logger.warning("opening the MLflow tracking store early failed: %s", _last_line(exc))
    return warm


def _run_job(job: dict[str, Any], spec: Any, splits: Any, config: dict[str, Any], board: Any, pool_id: str,
             rank: int, world: int, device: Any, warm: Any = None) -> None:
    from .worker import prepare_trial, train_trial

    key = job["key"]
    try:
        trial, error = prepare_trial(job, spec, splits, rank, world, device, warm), None
    except Exception as exc:  # before any collective call: every rank can agree to skip the job
        trial, error = None, exc
    failed_rank = _first_failed_rank(error is not None, rank, world)
    if failed_rank is not None:
        if rank == 0:
            message = _describe(error) if error is not None else f"setting up the trial failed on rank {failed_rank}"
            _end_job(board, pool_id, key, {"kind": "error", "message": message})
        return
    reporter = _Reporter(board, key, rank, world, Path(config["staging"]))
    try:
        train_trial(trial, spec, reporter, rank=rank, world=world, device=device,
                    tracking_uri=config["tracking_uri"])
    except Exception as exc:
        if rank == 0:
            _end_job(board, pool_id, key, {"kind": "error", "message": _describe(exc)})
        if world > 1:
            raise  # the ranks may be out of step in their collectives: Ray Train restarts the group
        return
    if rank == 0:
        _end_job(board, pool_id, key, {"kind": "done"})


class _Reporter:
    """Hands one eval to the trial and waits for Tune's decision, which every rank then shares."""

    def __init__(self, board: Any, key: str, rank: int, world: int, staging: Path) -> None:
        self.board, self.key, self.rank, self.world, self.staging = board, key, rank, world, staging

    def __call__(self, metrics: dict[str, float], save: Any) -> bool:
        decision = None
        if self.rank == 0:
            folder = None
            if save is not None:  # on shared storage: the trial function may run on another node
                folder = self.staging / f"{self.key}-{int(metrics.get('step', 0)):06d}"
                save(folder)
            self.board.post.remote(self.key, {"kind": "report", "metrics": metrics,
                                              "checkpoint": None if folder is None else str(folder)})
            decision = ray.get(self.board.await_decision.remote(self.key, DECISION_TIMEOUT_S))
        decision = _broadcast(decision, self.world) or STOP
        return not decision.get("stop")


def _end_job(board: Any, pool_id: str, key: str, event: dict[str, Any]) -> None:
    board.post.remote(key, event)
    ray.get(board.finish.remote(pool_id, key))


def _broadcast(value: Any, world: int) -> Any:
    """Rank 0's value on every rank (rank 0 alone talks to the board)."""
    if world == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_failed_rank(failed: bool, rank: int, world: int) -> int | None:
    if world == 1:
        return 0 if failed else None
    import torch
    import torch.distributed as dist

    flags = torch.zeros(world, dtype=torch.int64)
    flags[rank] = int(failed)
    if dist.get_backend() == "nccl":
        flags = flags.cuda()
    dist.all_reduce(flags)
    failed_ranks = flags.nonzero().flatten().tolist()
    return failed_ranks[0] if failed_ranks else None


def _describe(exc: BaseException) -> str:
    """The worker's traceback, ending with the exception's own line (what summaries show)."""
    return "".join(traceback.format_exception(exc)).rstrip()


def _last_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[-1] if lines else type(exc).__name__
