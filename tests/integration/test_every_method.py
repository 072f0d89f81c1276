"""Every engine method trains through the real platform: Ray Tune trial -> Ray Train worker -> MLflow.

The shipped ``methods_tour.yaml`` grid, shrunk to the tiny random Llama and two steps, so what
is tested is the wiring (config from the space, the worker loop, AdaLoRA's allocator hook,
prompt methods' virtual tokens, checkpoints, metrics), not learning.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from .conftest import ROOT, run_cli, runs_of, write_space

pytestmark = pytest.mark.integration

TOUR = yaml.safe_load((ROOT / "search_spaces" / "methods_tour.yaml").read_text())


def test_every_method_runs_a_trial(cluster, tmp_path: Path):
    methods = dict(TOUR["space"]["methods"])
    methods["adaption_prompt"] = {"adapter_len": 4, "adapter_layers": 2}  # the tiny model has 2 layers
    methods["adalora"] = {"init_r": 4, "target_r": 2, "tinit": 0, "tfinal": 0, "deltaT": 1}
    space = write_space(tmp_path, "itest-methods", **{
        "space.method": TOUR["space"]["method"], "space.methods": methods,
        "train.max_steps": 2, "train.eval_every": 2, "search.max_concurrent": 2, "registry.register": False})
    result = run_cli(cluster, space)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    _, children = runs_of(cluster, "itest-methods")
    by_method = {c.data.params["method"]: c for c in children}
    assert set(by_method) == set(TOUR["space"]["method"]["grid"]), sorted(by_method)
    failed = {m: c.data.tags.get("peft_sweeps.error") for m, c in by_method.items() if c.info.status != "FINISHED"}
    assert not failed, failed
    for method, run in by_method.items():
        assert run.data.metrics["eval_loss"] > 0, method
        assert run.data.metrics["trainable_params"] > 0, method
