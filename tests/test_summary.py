"""Choosing the winner from Tune's results: the best eval whose adapter checkpoint Tune kept."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from sweeps.space import load_space
from sweeps.summary import outcomes, pick_winner

SPACE = load_space("search_spaces/smoke.yaml")
CONFIG = SPACE.tune_search()[0]


def _result(trial_id: str, rows: list[dict], config: dict) -> SimpleNamespace:
    """A Tune result whose kept checkpoints are the rows with a ``kept`` path (Tune's best_checkpoints)."""
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "kept"} for r in rows])
    kept = [(SimpleNamespace(path=r["kept"]), {k: v for k, v in r.items() if k != "kept"}) for r in rows if r.get("kept")]
    return SimpleNamespace(config=config, metrics={**rows[-1], "trial_id": trial_id}, metrics_dataframe=frame,
                           error=None, path=f"/x/run_trial_{trial_id}", best_checkpoints=kept)


def _config() -> dict:
    """One concrete trial config of the smoke space (grid values resolved to their first choice)."""
    def first(value):
        if isinstance(value, dict) and "grid_search" in value:
            return value["grid_search"][0]
        if isinstance(value, dict):
            return {k: first(v) for k, v in value.items()}
        return value
    return first(CONFIG)


def test_winner_is_the_best_eval_with_a_checkpoint():
    config = _config()
    rows = [{"eval_loss": 2.0, "step": 4, "kept": None},  # best, but its checkpoint was not kept
            {"eval_loss": 2.5, "step": 8, "kept": "/ckpt/8"},
            {"eval_loss": 2.2, "step": 12, "kept": "/ckpt/12"}]
    other = [{"eval_loss": 2.3, "step": 12, "kept": "/other/12"}]
    results = [_result("aaaaa_00000", rows, config), _result("aaaaa_00001", other, config)]
    row = outcomes(SPACE, results)[0]
    assert (row.best, row.best_step, row.checkpoint) == (2.2, 12, "/ckpt/12")
    winner = pick_winner(SPACE, results)
    assert winner.trial_id == "aaaaa_00000" and winner.checkpoint == "/ckpt/12"


def test_a_trial_without_any_checkpoint_is_never_the_winner():
    config = _config()
    results = [_result("aaaaa_00000", [{"eval_loss": 1.0, "step": 4}], config),
               _result("aaaaa_00001", [{"eval_loss": 3.0, "step": 4, "kept": "/ckpt/4"}], config)]
    assert pick_winner(SPACE, results).checkpoint == "/ckpt/4"
