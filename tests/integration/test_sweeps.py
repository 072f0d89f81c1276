"""The sweep platform end to end: a real Ray head, a real MLflow server, real trials.

One Ray head (``ray start --head``) and one ``mlflow server`` serve the whole session
(see conftest.py), stopped by their process groups afterwards. Sweeps use the
tiny random Llama, so each trial is seconds of compute; what is tested is the platform:
runs, statuses, the registry gate, resuming, job submission, failures.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .conftest import ROOT, client, run_cli, runs_of, write_space

pytestmark = pytest.mark.integration


def test_sweep_killed_then_resumed_tracks_every_trial_once_and_registers_a_champion(cluster, tmp_path):
    space = write_space(tmp_path, "itest-main")
    driver = run_cli(cluster, space, background=True)
    sweep_dirs = cluster["storage"].glob("itest-main-*")
    deadline = time.monotonic() + 600
    # Kill the driver once the first trial has finished (its MLflow run is closed).
    while time.monotonic() < deadline:
        exp = client(cluster).get_experiment_by_name("itest-main")
        if exp is not None:
            done = [r for r in runs_of(cluster, "itest-main")[1] if r.info.status == "FINISHED"]
            if done:
                break
        assert driver.poll() is None, driver.stdout.read()
        time.sleep(2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert list(sweep_dirs), "the sweep folder exists"

    result = run_cli(cluster, space, "--resume")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 trials" in result.stdout

    parents, children = runs_of(cluster, "itest-main")
    assert len(parents) == 1, "a resumed sweep reuses its parent run"
    assert len(children) == 4, [c.data.tags.get("mlflow.runName") for c in children]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    assert len({c.data.tags["peft_sweeps.trial_id"] for c in children}) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        history = client(cluster).get_metric_history(child.info.run_id, "eval_loss")
        assert len(history) >= 2 and all(m.value > 0 for m in history)
        assert {"method", "targets", "quantization", "learning_rate"} <= set(child.data.params)
        for metric in ("train_loss", "step_time_s", "tokens_per_s", "peak_memory_mb", "trainable_params",
                       "packed_batch_share"):
            assert metric in child.data.metrics, metric
    champion = client(cluster).get_model_version_by_alias("itest-main-adapter", "champion")
    assert champion.tags["method"] in ("lora", "dora") and champion.tags["base_model"] == "tiny-random-llama"

    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = cluster["mlflow"].url
    model = mlflow.pyfunc.load_model("models:/itest-main-adapter@champion")
    replies = model.predict(["How are you?"], params={"max_new_tokens": 5})
    assert len(replies) == 1 and isinstance(replies[0], str)

    # A driver lost after every trial ended but before its registry step: the resumed sweep
    # has no trial to run. It still starts its worker pool, which must end before the driver
    # does (a pool thread waking inside Ray's shutdown ended such a driver with exit code 1).
    state_file = next(cluster["storage"].glob("itest-main-*/sweep.json"))
    state = json.loads(state_file.read_text())
    del state["outcome"]
    state_file.write_text(json.dumps(state))
    again = run_cli(cluster, space, "--resume")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "had not ended when the sweep did" not in again.stderr, again.stderr
    assert "4 trials: 4 finished" in again.stdout, again.stdout
    assert len(runs_of(cluster, "itest-main")[1]) == 4
    again_champion = client(cluster).get_model_version_by_alias("itest-main-adapter", "champion")
    assert again_champion.version == champion.version, "the same sweep's adapter is not registered twice"


def test_worse_sweep_keeps_the_champion_and_reports_the_regression(cluster, tmp_path):
    good = write_space(tmp_path, "itest-gate", **{"space.method": "lora",
                                                  "space.methods": {"lora": {"r": 4, "lora_alpha": 8}}})
    first = run_cli(cluster, good)
    assert first.returncode == 0, first.stdout + first.stderr
    # A healthy sweep's pools never fail (they once did, racing the driver's Ray imports).
    assert "Ray Train run failed" not in first.stdout + first.stderr, first.stdout + first.stderr
    c = client(cluster)
    champion = c.get_model_version_by_alias("itest-gate-adapter", "champion").version

    # Two Ray Train workers (DDP over gloo) and a learning rate too small to learn anything.
    worse = write_space(tmp_path, "itest-gate", **{"space.method": "lora", "space.learning_rate": 1.0e-7,
                                                   "space.methods": {"lora": {"r": 4, "lora_alpha": 8}},
                                                   "resources.workers": 2})
    second = run_cli(cluster, worse, "--fail-on-regression")
    assert second.returncode == 3, second.stdout + second.stderr
    assert "Ray Train run failed" not in second.stdout + second.stderr, second.stdout + second.stderr
    assert "REGRESSION" in second.stdout
    assert c.get_model_version_by_alias("itest-gate-adapter", "champion").version == champion
    candidate = c.get_model_version_by_alias("itest-gate-adapter", "candidate")
    assert candidate.version != champion and candidate.tags["gate"] == "regression"
    assert float(candidate.tags["candidate_eval_loss"]) > float(candidate.tags["champion_eval_loss"])
    parents, _ = runs_of(cluster, "itest-gate")
    latest = max(parents, key=lambda r: r.info.start_time)
    assert latest.data.tags["registry.gate"] == "regression"
    artifacts = [a.path for a in c.list_artifacts(latest.info.run_id)]
    assert "registry_report.md" in artifacts


def test_ray_job_submit_with_a_failing_trial(cluster, tmp_path, monkeypatch, capfd):
    from sweeps.submit import submit_command, submit_with_retry

    # One trial targets a module the model does not have: it must fail alone.
    space = write_space(tmp_path, "itest-job", **{"space.method": "lora",
                                                  "space.methods": {"lora": {"r": 2, "lora_alpha": 8}},
                                                  "space.targets": {"grid": ["attention", ["no_such_module"]]}})
    monkeypatch.chdir(ROOT)
    cmd, env = submit_command(cluster["state"], str(space), ["--tracking-uri", cluster["mlflow"].url])
    env["PEFT_SWEEPS_CACHE"] = os.environ.get("PEFT_SWEEPS_CACHE", "")
    assert submit_with_retry(cmd, env) == 0
    out = capfd.readouterr().out
    assert "succeeded" in out, out[-3000:]
    _, children = runs_of(cluster, "itest-job")
    statuses = sorted(c.info.status for c in children)
    assert statuses == ["FAILED", "FINISHED"], statuses
    failed = next(c for c in children if c.info.status == "FAILED")
    assert "no_such_module" in failed.data.tags.get("peft_sweeps.error", "") or failed.data.tags.get("peft_sweeps.outcome") == "failed"


def test_pbt_clones_a_better_trial_checkpoint(cluster, tmp_path):
    """PBT exploits through real Tune checkpoints: the worse trial continues from the better one's adapter."""
    space = write_space(tmp_path, "itest-pbt", **{
        "space.method": "lora", "space.methods": {"lora": {"r": 4, "lora_alpha": 8}},
        "space.learning_rate": {"loguniform": [1.0e-5, 1.0e-1]},  # distinct rates: distinct scores
        "search.algorithm": "random", "search.num_samples": 2, "search.max_concurrent": 2,
        "search.scheduler": {"type": "pbt", "perturbation_interval": 1},
        # Long enough (~10 s of tiny steps) that both trials train side by side: PBT only compares
        # running trials, and the second pool may start seconds after the first on a busy machine.
        "train.max_steps": 480, "train.eval_every": 80,
    })
    result = run_cli(cluster, space)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "Ray Train run failed" not in result.stdout + result.stderr, result.stdout[-4000:] + result.stderr[-4000:]
    sweep_dir = max(cluster["storage"].glob("itest-pbt-*"))
    policy = [json.loads(line) for line in (sweep_dir / "pbt_global.txt").read_text().splitlines() if line.strip()]
    assert policy, "PBT exploited no trial"
    _, children = runs_of(cluster, "itest-pbt")
    resumed = [c for c in children if "peft_sweeps.resumed_from_step" in c.data.tags]
    assert resumed, "the exploiting trial did not restart from the cloned checkpoint"
    assert all(int(c.data.tags["peft_sweeps.resumed_from_step"]) % 80 == 0 for c in resumed)
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
