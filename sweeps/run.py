"""Run a PEFT hyperparameter sweep: validate the space, run Ray Tune trials of Ray Train workers,
track everything in MLflow, register the winner and gate it against the champion.

    ray job submit --working-dir . -- python sweeps/run.py --space search_spaces/quickstart.yaml
    python sweeps/run.py --space search_spaces/smoke.yaml          # starts a local Ray if none runs

Exit codes: 0 done (no regression), 1 error, 2 invalid input, 3 regression found
(only with --fail-on-regression or --nightly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python sweeps/run.py` (the form `ray job submit` uses)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sweeps.space import SpaceError, SweepSpec, load_space  # noqa: E402

EXIT_OK, EXIT_ERROR, EXIT_INVALID, EXIT_REGRESSION = 0, 1, 2, 3
SWEEP_STATE = "sweep.json"
TRIAL_DRIVER_MEMORY = 256 * 2**20


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeps/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--space", required=True, type=Path, help="search-space YAML file (see search_spaces/)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="SWEEP_DIR",
                        help="continue an interrupted sweep: its folder under the storage path, or the latest "
                             "sweep of this space when no folder is given; MLflow runs are reused, not duplicated")
    parser.add_argument("--storage-path", default=None,
                        help="where Ray keeps trial state and checkpoints (shared storage on clusters); "
                             "default: $PEFT_SWEEPS_STORAGE or ~/ray_results/peft-sweeps")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address; default: $RAY_ADDRESS (set by `ray job submit`) or a new local Ray")
    parser.add_argument("--fail-on-regression", action="store_true",
                        help="exit with code 3 when the winner is worse than the registered champion")
    parser.add_argument("--nightly", action="store_true",
                        help="nightly regression mode: one sweep per night (see --night), re-runs continue it "
                             "without duplicate runs or model versions; implies --fail-on-regression")
    parser.add_argument("--night", default=None, metavar="YYYY-MM-DD",
                        help="which night a --nightly run belongs to (default: today, UTC)")
    parser.add_argument("--no-register", action="store_true", help="skip the Model Registry step")
    parser.add_argument("--dry-run", action="store_true", help="validate the space, print the plan, start nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = load_space(args.space)
    except SpaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    from sweeps.tracking import resolve_tracking_uri

    storage = Path(args.storage_path or os.environ.get("PEFT_SWEEPS_STORAGE") or Path.home() / "ray_results" / "peft-sweeps")
    storage = storage.expanduser().resolve()
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        if args.nightly:
            sweep_dir = storage / f"{spec.name}-night-{_night(args.night)}"
            args.resume = str(sweep_dir) if (sweep_dir / SWEEP_STATE).exists() else None
            args.fail_on_regression = True
        else:
            sweep_dir = _sweep_dir(storage, spec, args.resume)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    finished = _finished_outcome(sweep_dir)
    if finished is not None:  # an idempotent re-run of a night that already ended
        print(f"sweep {sweep_dir.name} already finished: {finished['describe']}")
        return EXIT_REGRESSION if finished["regression"] and args.fail_on_regression else EXIT_OK
    print(_plan(spec, sweep_dir, tracking_uri))
    if args.dry_run:
        return EXIT_OK
    try:
        outcome = run_sweep(spec, args.space, sweep_dir, tracking_uri, address=args.address,
                            resume=args.resume is not None, register=not args.no_register and spec.registry.register)
    except KeyboardInterrupt:
        print(f"interrupted: continue with --resume {sweep_dir}", file=sys.stderr)
        return EXIT_ERROR
    if outcome is None:
        return EXIT_ERROR
    if outcome.regression and args.fail_on_regression:
        return EXIT_REGRESSION
    return EXIT_OK


def _night(value: str | None) -> str:
    if value is None:
        return time.strftime("%Y-%m-%d", time.gmtime())
    try:
        time.strptime(value, "%Y-%m-%d")
    except ValueError:
        raise ValueError(f"--night={value!r} is not a date; allowed: YYYY-MM-DD") from None
    return value


def _finished_outcome(sweep_dir: Path) -> dict | None:
    state = sweep_dir / SWEEP_STATE
    if not state.exists():
        return None
    return json.loads(state.read_text()).get("outcome")


def _sweep_dir(storage: Path, spec: SweepSpec, resume: str | None) -> Path:
    if resume is None:
        return storage / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if resume != "latest":
        folder = Path(resume).expanduser()
        folder = folder if folder.is_absolute() else storage / folder
        if not (folder / SWEEP_STATE).exists():
            raise ValueError(f"--resume {resume}: {folder} holds no sweep ({SWEEP_STATE} missing)")
        return folder
    candidates = sorted(p.parent for p in storage.glob(f"{spec.name}-*/{SWEEP_STATE}"))
    if not candidates:
        raise ValueError(f"--resume: no earlier sweep named {spec.name!r} under {storage}")
    return candidates[-1]


def _plan(spec: SweepSpec, sweep_dir: Path, tracking_uri: str) -> str:
    s, r = spec.search, spec.resources
    return (f"sweep {spec.name}: {spec.count_trials()} trials ({s.algorithm}, scheduler {s.scheduler.type}), "
            f"{r.workers} Ray Train worker(s) x {r.cpus_per_worker} CPU / {r.gpus_per_worker} GPU per trial, "
            f"up to {s.max_concurrent} at once; optimising {s.metric} ({s.mode})\n"
            f"  base {spec.base.model}; data {spec.data.source}\n"
            f"  storage {sweep_dir}\n  MLflow {tracking_uri}")


def run_sweep(spec: SweepSpec, space_file: Path, sweep_dir: Path, tracking_uri: str, *, address: str | None = None,
              resume: bool = False, register: bool = True):
    """Run (or resume) the sweep; return the registry outcome (None when no trial succeeded)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from sweeps.board import TrialBoard
    from sweeps.pool import WorkerPools

    address = address or os.environ.get("RAY_ADDRESS")
    # A local Ray's workers import this project from the checkout even when it is not installed.
    runtime_env = None if address else {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}}
    ray.init(address=address, runtime_env=runtime_env, ignore_reinit_error=True, log_to_driver=True)
    state_file = sweep_dir / SWEEP_STATE
    fresh = not (resume and state_file.exists())
    if fresh:
        storage_path, data_dir = str(sweep_dir / "train_runs"), str(sweep_dir / "data")
    else:
        saved = json.loads(state_file.read_text())["context"]
        storage_path, data_dir = saved["storage_path"], saved["data_dir"]
    # The worker pools warm up (controller, workers, imports) while MLflow and the data are prepared.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    count = _pool_count(spec)
    board = TrialBoard.options(scheduling_strategy=here).remote(
        pools=count, max_resumes=spec.resources.worker_max_failures)
    pools = WorkerPools(spec, board, count=count, storage_path=storage_path, data_dir=data_dir,
                        tracking_uri=tracking_uri)
    pools.start()  # imports Ray Train and Tune first (see WorkerPools.start)
    # The rest is imported once the pools are on their way: on a small machine they compete for the cores.
    from ray import tune

    from sweeps.registry import gate_winner
    from sweeps.report import log_report
    from sweeps.summary import pick_winner, summarise, update_trial_runs
    from sweeps.tracking import SweepTracker
    from sweeps.trial import SweepContext, run_trial

    try:
        tracker = SweepTracker(tracking_uri, spec.name)
        if fresh:
            sweep_id = sweep_dir.name
            parent = tracker.start_sweep(sweep_id, name=sweep_id, params=_sweep_params(spec),
                                         space_file=str(space_file))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            context = SweepContext(sweep_id, parent, tracking_uri, spec.name, storage_path, data_dir)
            prepare_data(spec, Path(context.data_dir))
            state_file.write_text(json.dumps({"context": asdict(context), "space": str(space_file)}, indent=2))
        else:
            context = SweepContext(**saved)
        results = _fit(spec, sweep_dir, resume, tune.with_parameters(run_trial, spec=spec, sweep=context, board=board))
    finally:
        for pool_id in pools.close():
            print(f"warning: worker pool {pool_id} had not ended when the sweep did (waiting for resources, "
                  "or past the close timeout); its Ray Train run ends with this driver", file=sys.stderr)
    update_trial_runs(tracker, context, spec, results)
    summary = summarise(spec, results)
    print(summary)
    winner = pick_winner(spec, results)
    if winner is None:
        print("no trial finished with a metric: nothing to register", file=sys.stderr)
        tracker.end_run(context.parent_run_id, "FAILED")
        return None
    outcome = gate_winner(spec, tracker, context, winner, register=register)
    print(outcome.describe())
    log_report(tracker, context, spec, summary, outcome)
    state = json.loads(state_file.read_text())
    state["outcome"] = {"describe": outcome.describe(), "regression": outcome.regression, "version": outcome.version}
    state_file.write_text(json.dumps(state, indent=2))
    tracker.end_run(context.parent_run_id, "FINISHED")
    return outcome


def _fit(spec: SweepSpec, sweep_dir: Path, resume: bool, trial_fn: Any) -> Any:
    """Tune's run over the trials (or its continuation). A trial function only relays its job to
    a worker pool: it asks for memory, not a CPU, and the same actor serves one trial after another."""
    from ray import tune

    trainable = tune.with_resources(trial_fn, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})
    if resume and tune.Tuner.can_restore(str(sweep_dir)):
        return tune.Tuner.restore(str(sweep_dir), trainable=trainable, resume_errored=True).fit()
    param_space, search_alg = spec.tune_search()
    s = spec.search
    # Keep the two best checkpoints by the sweep's metric (Tune keeps the latest as well, for
    # resuming): the registry needs the best eval's adapter, which is not always a recent one.
    # Under PBT keep all: a trial may clone another's checkpoint while that one trains on.
    checkpoints = tune.CheckpointConfig(num_to_keep=None if s.scheduler.type == "pbt" else 2,
                                        checkpoint_score_attribute=s.metric, checkpoint_score_order=s.mode)
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=_scheduler(spec), reuse_actors=True,
                                    **spec.tune_config_kwargs()),
        run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                                  failure_config=tune.FailureConfig(max_failures=spec.resources.trial_max_failures),
                                  checkpoint_config=checkpoints, verbose=1),
    )
    return tuner.fit()


def _pool_count(spec: SweepSpec) -> int:
    """One warm worker pool per trial that may run at once."""
    return max(1, min(spec.search.max_concurrent, spec.count_trials()))


def prepare_data(spec: SweepSpec, folder: Path) -> Path:
    """Resolve the base once (filling the model cache before any trial races for it) and tokenize
    the data once; trials memory-map the result. The folder must be on storage every node sees."""
    from peft_engine.base_specs import load_tokenizer, resolve_base
    from sweeps.data import build_for_spec, save_splits

    resolved = resolve_base(spec.base.model)
    tokenizer = load_tokenizer(resolved.path, trust_remote_code=spec.base.trust_remote_code,
                               local_files_only=resolved.kind != "hub")
    splits = build_for_spec(spec, tokenizer)
    print(f"  data: {len(splits.train)} train / {len(splits.eval)} eval examples {splits.stats}")
    return save_splits(splits, folder)


def _sweep_params(spec: SweepSpec) -> dict:
    return {"base_model": spec.base.model, "task": spec.base.task, "data": spec.data.source,
            "algorithm": spec.search.algorithm, "scheduler": spec.search.scheduler.type,
            "num_trials": spec.count_trials(), "metric": spec.search.metric, "mode": spec.search.mode,
            "seed": spec.search.seed, "workers_per_trial": spec.resources.workers,
            "max_steps": spec.train.max_steps, "batch_size": spec.train.batch_size, "seq_len": spec.data.seq_len,
            "registry_model": spec.registry.model_name}


def _scheduler(spec: SweepSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    sched = spec.search.scheduler
    if sched.type == "asha":
        evals = _evals_per_trial(spec)
        return ASHAScheduler(time_attr="training_iteration", max_t=max(evals, 1),
                             grace_period=min(sched.grace_period, max(evals, 1)), reduction_factor=sched.reduction_factor)
    if sched.type == "pbt":
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=sched.perturbation_interval,
                                       hyperparam_mutations=spec.pbt_mutations())
    return FIFOScheduler()


def _evals_per_trial(spec: SweepSpec) -> int:
    steps = spec.train.max_steps or 0
    return max(1, -(-steps // spec.train.eval_every)) if steps else 100


if __name__ == "__main__":
    raise SystemExit(main())
