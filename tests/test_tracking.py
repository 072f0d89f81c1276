"""SweepTracker against a real MLflow store (SQLite): runs found again by tags, nothing lost on resume."""

from __future__ import annotations

from sweeps.tracking import SWEEP_TAG, TRIAL_TAG, SweepTracker


def _tracker(tmp_path) -> SweepTracker:
    return SweepTracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "tracking-test")


def test_resumed_trial_gets_its_run_back_with_the_params_a_killed_driver_never_logged(tmp_path):
    tracker = _tracker(tmp_path)
    parent = tracker.start_sweep("s1", name="sweep", params={"space": "x"}, space_file=None)
    # What a driver killed between create_run and logging the params leaves behind.
    orphan = tracker.client.create_run(tracker.experiment_id, tags={SWEEP_TAG: "s1", TRIAL_TAG: "t1",
                                                                     "peft_sweeps.kind": "trial"}).info.run_id
    params = {"method": "lora", "learning_rate": 1e-4}
    run_id = tracker.start_trial(parent, "s1", "t1", "trial-1", params)
    assert run_id == orphan
    assert tracker.client.get_run(run_id).data.params == {"method": "lora", "learning_rate": "0.0001"}
    assert tracker.start_trial(parent, "s1", "t1", "trial-1", params) == run_id  # params already there: no error
    other = tracker.start_trial(parent, "s1", "t2", "trial-2", {"method": "dora"})
    assert other != run_id and tracker.client.get_run(other).data.params == {"method": "dora"}


def test_resumed_sweep_fills_its_parent_runs_missing_params(tmp_path):
    tracker = _tracker(tmp_path)
    orphan = tracker.client.create_run(tracker.experiment_id, tags={SWEEP_TAG: "s2",
                                                                     "peft_sweeps.kind": "sweep"}).info.run_id
    run_id = tracker.start_sweep("s2", name="sweep", params={"num_samples": 4}, space_file=None)
    assert run_id == orphan
    assert tracker.client.get_run(run_id).data.params == {"num_samples": "4"}
