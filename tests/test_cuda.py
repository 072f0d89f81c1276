"""The CUDA paths of quantized bases: bitsandbytes int8 / NF4 layers on a GPU, LoRA and DoRA on them.

Skipped where torch sees no GPU (the development machine has none); ``make gpu-check`` runs this
file and ``tests/integration/test_cuda_sweep.py`` on a machine that has one. The checks and
tolerances are those of ``tests/test_quantization.py`` (CPU), on the device: the quantized
weights live on the GPU, training lowers the loss and leaves them untouched, a merge stays
within the same tolerance of the unmerged model, and a file written here gives HF PEFT the same
outputs on the same quantized base.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
bnb = pytest.importorskip("bitsandbytes")

from peft_engine import PeftModel, load_base  # noqa: E402
from tests.test_quantization import (  # noqa: E402
    BNB_TYPE,
    MERGE_OUTPUT_TOL,
    TARGETS,
    _adamw_losses,
    _base_bytes,
    _logits,
    _lora,
    _perturb,
    _quantized_layers,
)

CUDA_MODES = ("int8", "nf4")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    import os

    return os.environ.get("PEFT_SWEEPS_CACHE") or str(tmp_path_factory.mktemp("peft_sweeps_cache"))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(10, 2048, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()


def _load(cache_dir: str, mode: str) -> torch.nn.Module:
    model, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=cache_dir, device="cuda:0")
    return model


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_quantized_adapter_trains_and_merges_on_the_gpu(mode: str, dora: bool, cache_dir: str,
                                                       batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = _load(cache_dir, mode)
    layers = _quantized_layers(model)
    assert len(layers) == len(TARGETS) * 2
    assert all(type(m).__name__ == BNB_TYPE[mode] and m.weight.device.type == "cuda" for m in layers.values())
    base = _logits(model, batch)
    peft_model = _lora(model, dora)
    frozen = _base_bytes(peft_model)
    torch.cuda.reset_peak_memory_stats()
    losses = _adamw_losses(peft_model, batch)
    assert losses[-1] < losses[0] - 0.2, losses
    assert torch.cuda.max_memory_allocated() > 0
    for name, data in _base_bytes(peft_model).items():
        assert torch.equal(data, frozen[name]), name
    unmerged = _logits(peft_model, batch)
    effect = (unmerged - base).norm()
    peft_model.merge_adapter()
    deviation = float((_logits(peft_model, batch) - unmerged).norm() / effect)
    assert deviation < MERGE_OUTPUT_TOL[mode], f"merged logits off by {deviation:.3f} of the adapter's effect"


@pytest.mark.parametrize("mode", CUDA_MODES)
def test_adapter_file_gives_hf_peft_the_same_outputs_on_the_gpu(mode: str, cache_dir: str, batch: torch.Tensor,
                                                               tmp_path) -> None:
    import peft

    peft_model = _lora(_load(cache_dir, mode), init_lora_weights=False)
    _perturb(peft_model)
    expected = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    ours = PeftModel.from_pretrained(_load(cache_dir, mode), tmp_path)
    torch.testing.assert_close(_logits(ours, batch), expected, atol=1e-5, rtol=0)
    theirs = peft.PeftModel.from_pretrained(_load(cache_dir, mode), str(tmp_path))
    torch.testing.assert_close(_logits(theirs, batch), expected, atol=1e-5, rtol=0)
