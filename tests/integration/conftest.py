"""Shared by the integration tests: one real Ray head and one real MLflow server per session.

Both are started through :mod:`sweeps.stack` (127.0.0.1, own process groups) and stopped by
their process groups at the end; sweeps run ``sweeps/run.py`` as a real driver process.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sweeps import stack

ROOT = Path(__file__).resolve().parents[2]
SMOKE = yaml.safe_load((ROOT / "search_spaces" / "smoke.yaml").read_text())


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("stack")
    try:
        ray = stack.start_ray(state, num_cpus=2, timeout=240)
        mlflow = stack.start_mlflow(state, timeout=240)
        yield {"state": state, "ray": ray, "mlflow": mlflow, "address": stack.load(state, "ray")["address"],
               "storage": state / "results"}
    finally:
        stack.stop(state)


def write_space(folder: Path, name: str, **overrides) -> Path:
    data = copy.deepcopy(SMOKE)
    data["name"] = name
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run_cli(cluster, space: Path, *extra: str, background: bool = False):
    env = stack.ray_env(cluster["state"])
    env.update({"MLFLOW_TRACKING_URI": cluster["mlflow"].url, "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(space), "--address", cluster["address"],
           "--storage-path", str(cluster["storage"]), *extra]
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)


def client(cluster):
    from mlflow.tracking import MlflowClient

    return MlflowClient(cluster["mlflow"].url)


def runs_of(cluster, experiment: str):
    c = client(cluster)
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("peft_sweeps.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("peft_sweeps.kind") == "trial"]
    return parents, children
