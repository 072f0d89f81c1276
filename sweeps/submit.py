"""Submit a sweep to the local stack as a Ray job (what ``make sweep`` runs after ``stack start``).

It is the documented cluster command with the local addresses filled in:
``ray job submit --address <dashboard> --working-dir . -- python sweeps/run.py --space X``,
with the MLflow server, storage path and model cache passed to the job's environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .stack import DEFAULT_STATE_DIR, load, ray_env
from .tracking import git_commit


def submit_command(state_dir: Path, space: str, extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    ray, mlflow = load(state_dir, "ray"), load(state_dir, "mlflow")
    if ray is None or mlflow is None:
        raise SystemExit(f"no local stack recorded in {state_dir}: run `python -m sweeps.stack start` first")
    env_vars = {
        "MLFLOW_TRACKING_URI": mlflow["url"],
        "PEFT_SWEEPS_CACHE": os.environ.get("PEFT_SWEEPS_CACHE", str(Path(".cache/models").resolve())),
        "PEFT_SWEEPS_GIT_COMMIT": git_commit(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    runtime_env = {"env_vars": env_vars, "excludes": [".venv", ".cache", ".run", ".git", "*.db", "mlartifacts"]}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", ray["url"],
           "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "sweeps/run.py", "--space", space,
           "--storage-path", str((state_dir / "results").resolve()), *(extra or [])]
    return cmd, ray_env(state_dir)


def submit_with_retry(cmd: list[str], env: dict[str, str], attempts: int = 5, wait_s: float = 6.0) -> int:
    """Run ``ray job submit``; retry while a fresh head's job agent is not up yet.

    Right after ``ray start`` the dashboard answers before the node's job agent registers, and
    submission fails with "No available agent to submit job"; nothing was started then.
    """
    for attempt in range(1, attempts + 1):
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        transient = False
        for line in proc.stdout:
            print(line, end="", flush=True)
            transient = transient or "No available agent to submit job" in line
        code = proc.wait()
        if code == 0 or not transient or attempt == attempts:
            return code
        print(f"job agent not ready; retrying in {wait_s:.0f}s ({attempt}/{attempts})", flush=True)
        time.sleep(wait_s)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sweeps.submit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", required=True)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args, extra = parser.parse_known_args(argv)
    cmd, env = submit_command(args.state_dir, args.space, extra)
    ray, mlflow = load(args.state_dir, "ray"), load(args.state_dir, "mlflow")
    print(f"submitting {args.space} to the Ray head at {ray['url']}", flush=True)
    code = submit_with_retry(cmd, env)
    print(f"\nMLflow UI:      {mlflow['url']}  (experiments, trial runs, Models -> registry)\n"
          f"Ray dashboard:  {ray['url']}\n"
          f"Stop the stack: make stop")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
