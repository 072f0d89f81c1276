"""The sweep platform's per-trial overhead vs the peer a user would pick instead.

    .venv/bin/python -m benchmarks.sweep            # SmolLM2-135M-Instruct, 4 trials a side (~6 min on 2 cores)
    .venv/bin/python -m benchmarks.sweep --quick    # tiny-random-llama, 2 trials of 4 steps: checks it runs

The work, identical on both sides: LoRA r in {4, 16} x targets in {attention (q,k,v,o),
all-linear} on SmolLM2-135M-Instruct, 20 optimizer steps of batch 4 each, one evaluation on 64
held-out chatterbot Q/A pairs, trials one at a time with every CPU. Both tokenize the data with
``sweeps.data.build_datasets`` and the same tokenizer, so they train on the same examples.
The peer's Trainer pads each batch to its longest row (as transformers does by default); ours
runs causal-LM batches padding-free (``train.padding_free``, the default: same loss, no layer
computes on padding). ``--padded`` turns that off for ours, to see what it is worth.

* ours: ``sweeps/run.py`` on a temporary search-space YAML (grid, no early stopping, no
  registry), as a subprocess: Ray Tune trials of Ray Train workers, MLflow tracking.
* the peer: transformers' ``Trainer.hyperparameter_search(backend="ray")`` with HF PEFT's LoRA
  (``model_init`` builds each trial's model), also a subprocess, also a fresh local Ray.

Per trial, ``overhead = trial wall time (Tune's time_total_s) - compute`` where compute is the
time inside train steps and evaluation: our workers log it as ``compute_s`` (read from the
MLflow child runs), the peer's is timed by a TrainerCallback (train steps) plus the Trainer's
own ``eval_runtime``. ``efficiency = sum(compute) / sweep wall time``. Each side runs in a
fresh process with its own Ray; the sides alternate when ``--repeats`` > 1.
Results: benchmarks/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import command_line, fmt, format_table, goal, mark, median, write_json

ROOT = Path(__file__).resolve().parent.parent
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
WALL_GOAL = 0.80  # ours' sweep wall time <= this x the peer's
OVERHEAD_GOAL_S = 5.0  # ours' per-trial overhead <= this
LOSS_TOLERANCE = 0.02  # ours' best eval loss <= peer's x (1 + this): data order and LoRA init differ


@dataclass(frozen=True)
class Settings:
    """The work both sides do."""

    base: str = "smollm2-135m-instruct"
    ranks: tuple[int, ...] = (4, 16)
    targets: tuple[str, ...] = ("attention", "all-linear")
    steps: int = 20
    batch_size: int = 4
    eval_size: int = 64
    seq_len: int = 128
    learning_rate: float = 3e-4
    lora_alpha: int = 16
    seed: int = 0
    cpus: int = 1
    padding_free: bool = True  # ours only: the peer's Trainer pads every batch to its longest row

    @property
    def trials(self) -> int:
        return len(self.ranks) * len(self.targets)


QUICK = {"base": "tiny-random-llama", "ranks": (4, 16), "targets": ("attention",), "steps": 4, "eval_size": 16,
         "seq_len": 64}


# ----------------------------------------------------------------------------- ours


def space_yaml(s: Settings) -> str:
    """The search space equivalent to the peer's grid (see docs/SEARCH_SPACE.md for the schema)."""
    import yaml

    space = {
        "name": "bench-sweep",
        "base": {"model": s.base, "task": "causal_lm", "dtype": "float32"},
        "data": {"source": "chatterbot-corpus", "eval_size": s.eval_size, "seq_len": s.seq_len},
        "train": {"max_steps": s.steps, "batch_size": s.batch_size, "eval_every": s.steps, "lr_schedule": "linear",
                  "max_grad_norm": 1.0, "padding_free": s.padding_free},
        "search": {"algorithm": "grid", "num_samples": 1, "max_concurrent": 1, "metric": "eval_loss",
                   "seed": s.seed, "scheduler": {"type": "none"}},
        "resources": {"workers": 1, "cpus_per_worker": s.cpus},
        "registry": {"register": False},
        "space": {"method": "lora", "targets": {"grid": list(s.targets)}, "quantization": "none",
                  "learning_rate": s.learning_rate,
                  "methods": {"lora": {"r": {"grid": list(s.ranks)}, "lora_alpha": s.lora_alpha,
                                       "lora_dropout": 0.0}}},
    }
    return yaml.safe_dump(space, sort_keys=False)


def run_ours(s: Settings, work: Path, timeout: float) -> dict[str, Any]:
    space = work / "space.yaml"
    space.write_text(space_yaml(s))
    storage, db = work / "ours", work / "mlflow.db"
    cmd = [sys.executable, "sweeps/run.py", "--space", str(space), "--storage-path", str(storage),
           "--tracking-uri", f"sqlite:///{db}", "--no-register", "--address", "local"]
    out = _run(cmd, work / "ours.log", timeout)
    out["command"] = " ".join(cmd[1:])
    trials = _tune_trials(storage)
    compute = _mlflow_trials(f"sqlite:///{db}", "bench-sweep")
    for t in trials:  # join Tune's wall time with the worker's own clock (MLflow), by Tune trial id
        t.update(compute.get(t["trial_id"], {}))
    out["trials"] = trials
    return out


def _tune_trials(storage: Path) -> list[dict[str, Any]]:
    """Each trial's last Tune result (result.json lines): wall time and the worker's metrics."""
    trials = []
    for path in sorted(storage.glob("*/*/result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            continue
        last = lines[-1]
        trials.append({"trial_id": last.get("trial_id"), "wall_s": last.get("time_total_s"),
                       "ended": last.get("timestamp"),
                       "eval_loss": last.get("eval_loss"), "compute_s_tune": last.get("compute_s"),
                       "config": last.get("config", {}).get("params", last.get("config"))})
    return trials


def _mlflow_trials(tracking_uri: str, experiment: str) -> dict[str, dict[str, Any]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`peft_sweeps.kind` = 'trial'",
                              max_results=1000)
    out = {}
    for run in runs:
        m = run.data.metrics
        out[run.data.tags.get("peft_sweeps.trial_id", run.info.run_id)] = {
            "compute_s": m.get("compute_s"), "load_s": m.get("load_s"), "mlflow_eval_loss": m.get("eval_loss"),
            "step_time_s": m.get("step_time_s"), "mlflow_status": run.info.status}
    return out


# ----------------------------------------------------------------------------- the peer (runs in a child process)


class PeerModelInit:
    """``model_init(trial)`` for the Trainer: the base from the same cache as ours, HF PEFT LoRA on top.

    A class, not a closure or partial: the Trainer counts ``model_init``'s parameters (it must
    take exactly ``trial``) and Ray pickles it into every trial.
    """

    def __init__(self, s: Settings) -> None:
        self.s = s

    def __call__(self, trial: dict[str, Any] | None) -> Any:
        import peft

        from peft_engine.bases import load_base

        params = trial or {}
        r, targets = params.get("r", self.s.ranks[0]), params.get("targets", self.s.targets[0])
        model, _ = load_base(self.s.base)
        config = peft.LoraConfig(r=r, lora_alpha=self.s.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                 target_modules=ATTENTION if targets == "attention" else "all-linear")
        return peft.get_peft_model(model, config)


def _timing_callback(out_path: str) -> Any:
    from transformers import TrainerCallback

    class TimingCallback(TrainerCallback):
        """Seconds inside train steps (step begin -> end) and evaluation (the Trainer's eval_runtime)."""

        def __init__(self) -> None:
            self.out_path = out_path
            self.reset()

        def reset(self) -> None:
            self.train_s = self.eval_s = 0.0
            self.steps = 0
            self.started = None
            self.params: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.reset()
            cfg = getattr(model, "peft_config", {}).get("default")
            if cfg is not None:
                targets = cfg.target_modules
                self.params = {"r": cfg.r, "targets": sorted(targets) if isinstance(targets, set) else targets}

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.started is not None:
                self.train_s += time.perf_counter() - self.started
                self.steps += 1
                self.started = None

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics = metrics or {}
            self.eval_s += float(metrics.get("eval_runtime", 0.0))
            row = {"pid": os.getpid(), **self.params, "train_s": self.train_s, "eval_s": self.eval_s,
                   "compute_s": self.train_s + self.eval_s, "steps": self.steps,
                   "eval_loss": metrics.get("eval_loss"), "time": time.time()}
            with open(self.out_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    return TimingCallback()


def peer_child(config_path: Path) -> int:
    """The peer's whole run, in its own process; writes its findings next to ``config_path``."""
    cfg = json.loads(config_path.read_text())
    s = Settings(**{**cfg["settings"], "ranks": tuple(cfg["settings"]["ranks"]),
                    "targets": tuple(cfg["settings"]["targets"])})
    work = config_path.parent
    result: dict[str, Any] = {"settings": asdict(s)}
    started = time.perf_counter()
    try:
        import ray
        from ray import tune
        from transformers import Trainer, TrainingArguments

        from peft_engine.base_specs import load_tokenizer, resolve_base
        from sweeps.data import build_datasets

        resolved = resolve_base(s.base)
        tokenizer = load_tokenizer(resolved.path, local_files_only=resolved.kind != "hub")
        splits = build_datasets("chatterbot-corpus", tokenizer=tokenizer, seq_len=s.seq_len, seed=s.seed,
                                eval_size=s.eval_size)
        result["data"] = {"train": len(splits.train), "eval": len(splits.eval)}
        args = TrainingArguments(
            output_dir=str(work / "peer-out"), max_steps=s.steps, per_device_train_batch_size=s.batch_size,
            per_device_eval_batch_size=s.batch_size, learning_rate=s.learning_rate, lr_scheduler_type="linear",
            weight_decay=0.0, max_grad_norm=1.0, eval_strategy="no", save_strategy="no", report_to="none",
            seed=s.seed, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        )
        calls = work / "peer_calls.jsonl"
        trainer = Trainer(model_init=PeerModelInit(s), args=args, train_dataset=splits.train,
                          eval_dataset=splits.eval, data_collator=_Collator(splits.pad_token_id),
                          callbacks=[_timing_callback(str(calls))])
        result["setup_s"] = time.perf_counter() - started
        search_started = time.perf_counter()
        ray.init(address="local", include_dashboard=None, log_to_driver=True)
        result["ray_init_s"] = time.perf_counter() - search_started
        best = trainer.hyperparameter_search(
            direction="minimize", backend="ray", n_trials=1,
            hp_space=lambda _: {"r": tune.grid_search(list(s.ranks)), "targets": tune.grid_search(list(s.targets))},
            resources_per_trial={"cpu": s.cpus}, max_concurrent_trials=1,
            storage_path=str(work / "peer"), name="peer", verbose=1,
        )
        result["search_s"] = time.perf_counter() - search_started
        result["best"] = {"objective": best.objective, "hyperparameters": best.hyperparameters}
        result["trials"] = [{"trial_id": t.trial_id, "status": t.status, "config": t.config,
                             "wall_s": (t.last_result or {}).get("time_total_s"),
                             "ended": (t.last_result or {}).get("timestamp"),
                             "eval_loss": (t.last_result or {}).get("eval_loss")}
                            for t in best.run_summary.trials]
        result["calls"] = [json.loads(x) for x in calls.read_text().splitlines()] if calls.exists() else []
        status = 0
    except Exception as exc:
        import traceback

        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()[-4000:]
        status = 1
    result["child_wall_s"] = time.perf_counter() - started
    (work / "peer_result.json").write_text(json.dumps(result, indent=2, default=str))
    return status


class _Collator:
    """``sweeps.data.collate`` with the pad id bound (picklable for Ray, unlike a lambda)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        from sweeps.data import collate

        return collate(batch, self.pad_token_id)


def run_peer(s: Settings, work: Path, timeout: float) -> dict[str, Any]:
    config = work / "peer_config.json"
    config.write_text(json.dumps({"settings": asdict(s)}))
    cmd = [sys.executable, "-m", "benchmarks.sweep", "--peer-child", str(config)]
    out = _run(cmd, work / "peer.log", timeout)
    found = work / "peer_result.json"
    child = json.loads(found.read_text()) if found.exists() else {"error": "the peer wrote no result"}
    out.update({k: v for k, v in child.items() if k != "settings"})
    # Join Tune's per-trial wall time with the callback's compute, by trial parameters.
    calls = child.get("calls", [])
    for t in out.get("trials", []):
        cfg = t.get("config") or {}
        want = ATTENTION if cfg.get("targets") == "attention" else cfg.get("targets")
        match = [c for c in calls if c.get("r") == cfg.get("r") and _same_targets(c.get("targets"), want)]
        if match:
            t.update({k: match[-1][k] for k in ("compute_s", "train_s", "eval_s", "steps")})
    return out


def _same_targets(found: Any, wanted: Any) -> bool:
    """HF PEFT expands "all-linear" into the module names it wrapped: any list beyond attention's."""
    if isinstance(found, list) and isinstance(wanted, list):
        return sorted(found) == sorted(wanted)
    if wanted == "all-linear" and isinstance(found, list):
        return set(found) > set(ATTENTION)
    return found == wanted


# ----------------------------------------------------------------------------- running and reporting


def _run(cmd: list[str], log: Path, timeout: float) -> dict[str, Any]:
    """Run ``cmd`` from the repository root in its own session with its own Ray temp dir; time it."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "RAY_TMPDIR": str(ray_tmp), "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # our child's own session: the sweep and the Ray it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - started
    shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"rc": rc, "wall_s": wall, "log": str(log)}


def summarise_side(side: dict[str, Any]) -> dict[str, Any]:
    trials = side.get("trials", [])
    overheads = [t["wall_s"] - t["compute_s"] for t in trials if t.get("wall_s") is not None and t.get("compute_s")]
    compute = [t["compute_s"] for t in trials if t.get("compute_s")]
    losses = [t["eval_loss"] for t in trials if t.get("eval_loss") is not None]
    trial_walls = [t["wall_s"] for t in trials if t.get("wall_s") is not None]
    wall = side.get("wall_s")
    # Tune's time_total_s starts once the trial's actor runs its function: a peer whose trial
    # actor imports transformers before that, or is reused, pays costs it does not show. The
    # spacing of consecutive trial ends (trials run one at a time) counts everything a trial costs.
    ended = sorted((t["ended"], t.get("compute_s")) for t in trials if t.get("ended") is not None)
    marginal = [b - a - c for (a, _), (b, c) in zip(ended, ended[1:]) if c is not None]
    return {
        "ok": side.get("rc") == 0 and len(losses) > 0,
        "wall_s": wall, "trials": len(trials), "trial_wall_s": trial_walls,
        "trial_overhead_s": overheads,
        "mean_trial_overhead_s": sum(overheads) / len(overheads) if overheads else None,
        "median_trial_overhead_s": median(overheads),
        "marginal_trial_overhead_s": median(marginal),
        "compute_s": sum(compute) if compute else None,
        "outside_trials_s": wall - sum(trial_walls) if wall is not None and trial_walls else None,
        "efficiency": sum(compute) / wall if compute and wall else None,
        "best_eval_loss": min(losses) if losses else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | int:
    args = build_parser().parse_args(argv)
    if args.peer_child:
        return peer_child(Path(args.peer_child))
    cpus = args.cpus or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    s = Settings(**({**QUICK, "cpus": cpus} if args.quick else {"cpus": cpus}), padding_free=not args.padded)
    work = Path(tempfile.mkdtemp(prefix="peft-sweeps-bench-"))
    print(f"sweep benchmark: {s.trials} trials of LoRA on {s.base}, {s.steps} steps x batch {s.batch_size}, "
          f"eval {s.eval_size} pairs, {s.cpus} CPU(s) per trial; work dir {work}", flush=True)
    runs: list[dict[str, Any]] = []
    sides = {"ours": run_ours, "peer": run_peer}
    for r in range(args.repeats):
        order = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]
        for name in order:
            if args.only and name != args.only:
                continue
            folder = work / f"{name}-{r}"
            folder.mkdir()
            print(f"  [{r + 1}/{args.repeats}] {name} ...", flush=True)
            side = sides[name](s, folder, args.timeout)
            side["summary"] = summarise_side(side)
            runs.append({"side": name, "repeat": r, **side})
            print(f"    wall {fmt(side['wall_s'], '.1f')} s, rc {side['rc']}"
                  + ("" if side["summary"]["ok"] else f"  -- FAILED, see {side['log']}"), flush=True)
            if not side["summary"]["ok"]:
                print(_tail(Path(side["log"])), flush=True)
    payload = report(s, runs, args)
    if not args.keep and all(r["summary"]["ok"] for r in runs):
        shutil.rmtree(work, ignore_errors=True)
        payload["work_dir"] = None
    else:
        payload["work_dir"] = str(work)
        print(f"logs and sweep folders kept in {work}")
    path = write_json(args.name or ("sweep_quick" if args.quick else "sweep"), payload, command=command_line("benchmarks.sweep", argv))
    print(f"results: {path}")
    return payload


def report(s: Settings, runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    by_side = {name: [r["summary"] for r in runs if r["side"] == name] for name in ("ours", "peer")}

    def med(name: str, key: str) -> float | None:
        return median([x[key] for x in by_side[name] if x.get(key) is not None])

    ours_wall, peer_wall = med("ours", "wall_s"), med("peer", "wall_s")
    ours_best, peer_best = med("ours", "best_eval_loss"), med("peer", "best_eval_loss")
    ratio = ours_wall / peer_wall if ours_wall and peer_wall else None
    goals = {
        "wall_vs_peer": goal(ratio, WALL_GOAL),
        "trial_overhead_s": goal(med("ours", "mean_trial_overhead_s"), OVERHEAD_GOAL_S),
        "best_eval_loss_vs_peer": goal(ours_best / peer_best if ours_best and peer_best else None,
                                       1 + LOSS_TOLERANCE),
    }
    rows = []
    for name, label in (("ours", "ours (sweeps/run.py)"), ("peer", "peer (Trainer.hyperparameter_search ray)")):
        rows.append({"side": label, "wall": fmt(med(name, "wall_s"), ".1f"),
                     "ovh": fmt(med(name, "mean_trial_overhead_s"), ".1f"),
                     "marginal": fmt(med(name, "marginal_trial_overhead_s"), ".0f"),
                     "outside": fmt(med(name, "outside_trials_s"), ".1f"),
                     "compute": fmt(med(name, "compute_s"), ".1f"), "eff": fmt(med(name, "efficiency"), ".2f"),
                     "loss": fmt(med(name, "best_eval_loss"), ".4f")})
    print(f"\nSweep: {s.trials} trials, LoRA r {list(s.ranks)} x targets {list(s.targets)} on {s.base}, "
          f"{s.steps} steps x batch {s.batch_size}; medians over {args.repeats} run(s) a side")
    print(format_table(rows, [("side", "side"), ("wall", "wall s"), ("ovh", "overhead/trial s"),
                              ("marginal", "end-to-end overhead/trial s"),
                              ("outside", "outside trials s"), ("compute", "compute s"), ("eff", "efficiency"),
                              ("loss", "best eval loss")]))
    print("overhead/trial: Tune's time_total_s - compute (goal); end-to-end: gap between consecutive trial ends"
          " - compute (1 s resolution; also counts trial actor start-up, which time_total_s does not)")
    lines = summary_lines({"goals": goals})
    print("\n".join(lines))
    peer_errors = [r.get("error") for r in runs if r["side"] == "peer" and r.get("error")]
    peer_ran = any(r["side"] == "peer" and r["summary"]["ok"] for r in runs)
    return {"quick": args.quick, "settings": asdict(s), "repeats": args.repeats, "runs": runs,
            "ours_wall_s": ours_wall, "peer_wall_s": peer_wall, "ratio_wall_vs_peer": ratio,
            "ours_best_eval_loss": ours_best, "peer_best_eval_loss": peer_best, "goals": goals,
            "peer_errors": peer_errors,
            "peer_status": ("transformers Trainer.hyperparameter_search(backend='ray') ran unmodified with this Ray "
                            "(no workaround needed)") if peer_ran else "the peer did not finish: see peer_errors / logs",
            "peer_method": "transformers Trainer.hyperparameter_search(backend='ray') with HF PEFT LoRA via "
                           "model_init; TrainerCallback times train steps, Trainer eval_runtime times eval",
            "definitions": {
                "wall_s": "the side's whole subprocess, start to exit, timed by this benchmark",
                "trial wall_s": "Tune's time_total_s of the trial's last result",
                "compute_s": "seconds inside train steps + evaluation (ours: the worker's StepClock via MLflow; "
                             "peer: TrainerCallback step_begin->step_end + eval_runtime)",
                "mean_trial_overhead_s": "mean of trial wall_s - compute_s (the goal's figure)",
                "marginal_trial_overhead_s": "median gap between consecutive trial ends - compute_s (1 s resolution)",
                "peer setup_s / ray_init_s / search_s": "data + Trainer (incl. model_init) / ray.init / "
                                                        "ray.init + hyperparameter_search",
                "efficiency": "sum(compute_s) / wall_s"}}


def summary_lines(payload: dict[str, Any]) -> list[str]:
    g = payload["goals"]
    w, o, q = g["wall_vs_peer"], g["trial_overhead_s"], g["best_eval_loss_vs_peer"]
    return [f"sweep: wall ours/peer {fmt(w['value'], '.3f')} ({mark(w)} <= {w['limit']:.2f}); "
            f"overhead per trial {fmt(o['value'], '.1f')} s ({mark(o)} <= {o['limit']:.0f} s); "
            f"best eval loss ours/peer {fmt(q['value'], '.3f')} ({mark(q)} <= {q['limit']:.2f})"]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny-random-llama, 2 trials of 4 steps: checks it runs")
    p.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating who goes first")
    p.add_argument("--cpus", type=int, default=None, help="CPUs per trial on both sides (default: all usable)")
    p.add_argument("--padded", action="store_true",
                   help="ours pads batches as the peer does (train.padding_free: false), to see what packing is worth")
    p.add_argument("--only", choices=["ours", "peer"], default=None, help="run one side only (debugging)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a side is stopped")
    p.add_argument("--keep", action="store_true", help="keep the work dir (logs, Ray and MLflow folders)")
    p.add_argument("--name", default=None,
                   help="results file name under benchmarks/results/ (default sweep, or sweep_quick with --quick)")
    p.add_argument("--peer-child", default=None, help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    result = main()
    raise SystemExit(result if isinstance(result, int) else 0)
