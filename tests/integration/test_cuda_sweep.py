"""A QLoRA sweep on a GPU: Ray Train workers with a GPU each, NCCL, the NF4 base on each worker's
local rank. Skipped where torch sees no GPU; ``make gpu-check`` runs it where one is."""

from __future__ import annotations

import pytest
import torch

from .conftest import run_cli, runs_of, write_space

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")]


def test_qlora_sweep_trains_on_the_gpu(cluster, tmp_path):
    workers = min(2, torch.cuda.device_count())
    space = write_space(tmp_path, "itest-cuda", **{
        "space.method": "lora", "space.methods": {"lora": {"r": 4, "lora_alpha": 8}},
        "space.quantization": {"grid": ["nf4", "int8"]}, "search.algorithm": "grid",
        "resources.workers": workers, "resources.gpus_per_worker": 1, "resources.cpus_per_worker": 1,
        "search.max_concurrent": 1})
    result = run_cli(cluster, space)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    _, children = runs_of(cluster, "itest-cuda")
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert len(finished) == 2, [r.info.status for r in children]
    for run in finished:
        # On CUDA the worker logs torch.cuda.max_memory_allocated (MiB), well below a CPU process's RSS.
        assert 0 < run.data.metrics["peak_memory_mb"] < 2048, run.data.metrics
        assert run.data.metrics["eval_loss"] == run.data.metrics["eval_loss"]  # not NaN
