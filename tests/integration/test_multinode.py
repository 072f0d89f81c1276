"""A sweep on a two-node Ray cluster survives losing a node.

Two ``ray start`` processes on one machine stand in for two machines: a head (1 CPU) and a
worker node (1 CPU) joined to it, each its own session (``sweeps.stack``); a local tmp
folder both see is the shared storage. Every Ray Train worker needs 1 CPU, so with two
trials at once one warm worker pool runs on each node. Once a trial has checkpointed on the
worker node and is still training, every process of that node is killed at once (a machine
lost mid-sweep: its Ray Train worker must not go on training for the seconds an orphaned Ray
worker takes to notice that its raylet is gone, or it may finish the trial and hide the
loss). The board hands the lost job to the head's pool (``worker_max_failures``), or Tune
retries the trial when its trial actor was lost too (``trial_max_failures``); either way it
resumes from its last adapter checkpoint on shared storage (its MLflow run records
``resumed_from_step``), and the sweep must still end normally with all 4 trials and a champion.

This test uses its own cluster and MLflow server, not the session ``cluster`` fixture.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweeps import stack

from .conftest import ROOT, client, runs_of, write_space

pytestmark = pytest.mark.integration

NAME = "itest-multinode"
WORKER = "ray-worker-1"
START_S = 240  # per service; start-up is slow when the machine is loaded
STEPS = 600  # tiny-model steps take ~0.02-0.05 s: leave seconds between checkpoints
EVAL_EVERY = 200
TIMEOUT_S = 600  # a busy 2-core machine; about 4 minutes on a quiet one


def _state_api(dashboard: str, token: str, resource: str, **filters: str) -> list[dict]:
    """Ray's state API over HTTP (``/api/v0/<resource>``) with our token.

    Plain HTTP rather than ``ray.util.state``: the test process may already hold another
    cluster's token (the session fixture), and Ray reads the token once per process.
    """
    query = [("limit", "10000"), ("detail", "1")]
    for key, value in filters.items():
        query += [("filter_keys", key), ("filter_predicates", "="), ("filter_values", value)]
    request = urllib.request.Request(f"{dashboard}/api/v0/{resource}?{urllib.parse.urlencode(query)}",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=20) as response:
        body = json.loads(response.read())
    return body["data"]["result"]["result"]


def _start_driver(state: Path, mlflow_url: str, address: str, storage: Path, space: Path, log: Path):
    """``sweeps/run.py`` as a real driver; output to a file (a pipe would fill and block it)."""
    env = stack.ray_env(state)
    env.update({"MLFLOW_TRACKING_URI": mlflow_url, "HF_HUB_OFFLINE": "1"})
    cmd = [sys.executable, str(ROOT / "sweeps" / "run.py"), "--space", str(space), "--address", address,
           "--storage-path", str(storage)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def _training_on(storage: Path, node_id: str, total_steps: int) -> set[str]:
    """Checkpoints written on ``node_id`` by trials that are still training (Tune's trial folders)."""
    found = set()
    for state_file in storage.glob("*/run_trial_*/checkpoint_*/trainer_state.json"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):  # being written
            continue
        trial = state_file.parent.parent
        latest = max(trial.glob("checkpoint_*"), default=None)
        if state.get("node_id") == node_id and state["step"] < total_steps and latest == state_file.parent:
            found.add(str(state_file.parent))
    return found


def test_sweep_survives_losing_a_worker_node(tmp_path):
    state, storage, driver_log = tmp_path / "stack", tmp_path / "shared-storage", tmp_path / "driver.log"
    space = write_space(tmp_path, NAME, **{
        "search.max_concurrent": 2,
        "resources.workers": 1, "resources.cpus_per_worker": 1,
        "resources.trial_max_failures": 2, "resources.worker_max_failures": 1,
        "train.max_steps": STEPS, "train.eval_every": EVAL_EVERY,
    })
    driver = None
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(1) as pool:  # MLflow starts while the head does
            pending_mlflow = pool.submit(stack.start_mlflow, state, timeout=START_S)
            head = stack.start_ray(state, num_cpus=1, timeout=START_S)
            mlflow = pending_mlflow.result()
        address = stack.load(state, "ray")["address"]
        stack.start_ray_worker(state, address, num_cpus=1, resources=None, name=WORKER,
                               timeout=START_S)
        token = (state / "ray_auth_token").read_text().strip()

        nodes = []
        deadline = time.monotonic() + 60
        while len(nodes) < 2 and time.monotonic() < deadline:
            nodes = [n for n in _state_api(head.url, token, "nodes") if n["state"] == "ALIVE"]
            time.sleep(1)
        assert len(nodes) == 2, nodes
        head_node = next(n["node_id"] for n in nodes if n["is_head_node"])
        worker_node = next(n["node_id"] for n in nodes if not n["is_head_node"])

        driver = _start_driver(state, mlflow.url, address, storage, space, driver_log)
        seen: dict[str, str] = {}  # Ray Train worker actor id -> node id
        killed_at = None
        candidates: set[str] = set()
        deadline = time.monotonic() + TIMEOUT_S
        while driver.poll() is None and time.monotonic() < deadline:
            for actor in _state_api(head.url, token, "actors", class_name="RayTrainWorker"):
                if actor.get("node_id"):
                    seen[actor["actor_id"]] = actor["node_id"]
            # Lose the node while a trial that has checkpointed there is still training: the same
            # latest checkpoint seen on two polls a second apart, so Tune has taken it in.
            now_training = _training_on(storage, worker_node, STEPS)
            if killed_at is None and candidates & now_training:
                stack.stop(state, WORKER, grace=0)
                killed_at = time.monotonic() - started
            candidates = now_training
            time.sleep(1)
        if driver.poll() is None:
            pytest.fail(f"the sweep did not end within {TIMEOUT_S}s:\n{driver_log.read_text()[-4000:]}")
        output = driver_log.read_text(errors="replace")

        assert killed_at is not None, f"no trial ever trained on the worker node; seen {seen}\n{output[-4000:]}"
        assert {head_node, worker_node} <= set(seen.values()), f"trials ran on {set(seen.values())}"
        assert driver.returncode == 0, output[-6000:]
        assert "4 trials: 4 finished, 0 stopped early, 0 failed" in output, output[-4000:]
        # The board (lost pool) or Tune (trial retry) may catch the loss; either way the lost
        # trial restarted from its checkpoint, and its run records where it picked up.
        resumed = [c for c in runs_of({"mlflow": mlflow}, NAME)[1] if "peft_sweeps.resumed_from_step" in c.data.tags]
        assert resumed, f"the node loss hit no running trial (nothing resumed)\n{output[-4000:]}"
        assert all(int(c.data.tags["peft_sweeps.resumed_from_step"]) >= EVAL_EVERY for c in resumed)

        parents, children = runs_of({"mlflow": mlflow}, NAME)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len({c.data.tags["peft_sweeps.trial_id"] for c in children}) == 4
        assert sorted(c.info.status for c in children) == ["FINISHED"] * 4, [
            (c.data.tags.get("mlflow.runName"), c.info.status) for c in children]
        for child in children:  # every trial's evals reached MLflow, the lost one's across both attempts
            history = client({"mlflow": mlflow}).get_metric_history(child.info.run_id, "eval_loss")
            assert {m.step for m in history} == set(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY)), (child.data.tags.get("mlflow.runName"), history)
        champion = client({"mlflow": mlflow}).get_model_version_by_alias(f"{NAME}-adapter", "champion")
        assert champion.tags["method"] in ("lora", "dora")
        print(f"worker node killed at {killed_at:.0f}s; sweep done at {time.monotonic() - started:.0f}s")
    finally:
        if driver is not None and driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(timeout=30)
        stack.stop(state, WORKER)
        stack.stop(state)
