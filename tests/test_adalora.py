"""AdaLoRA against HF PEFT 0.21.2: SVD-form layers, files, and the rank allocator in a training loop.

The training test runs the same SGD steps on HF PEFT's model and ours from the same weights,
calling ``update_and_allocate`` after every step as the sweep worker does: losses (which
include the orthogonality regulariser), the rank pattern chosen at each step, the final
outputs and the pruned adapter files must all agree.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file

import peft_engine as pe
from peft_engine.tuners.adalora import AdaLoraLayer
from tests.conftest import (
    assert_close,
    model_inputs,
    perturb_adapters,
    run,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

peft = pytest.importorskip("peft")

SCHEDULE = dict(target_modules=["q_proj", "v_proj", "down_proj"], init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=1,
                total_step=8, task_type="CAUSAL_LM")


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _pair(tmp_path, build=tiny_llama, **kwargs):
    hf = _quiet(peft.get_peft_model, build(), peft.AdaLoraConfig(**kwargs))
    perturb_adapters(hf, scale=0.1)
    hf.save_pretrained(tmp_path / "start")
    ours = _quiet(pe.PeftModel.from_pretrained, build(), tmp_path / "start", is_trainable=True)
    return hf, ours


@pytest.mark.parametrize("build,kwargs", [
    (tiny_llama, dict(target_modules=["q_proj", "v_proj"], init_r=6, total_step=10)),
    (tiny_gpt2, dict(init_r=6, total_step=10, lora_alpha=16)),  # default targets, Conv1D
    (tiny_convnet, dict(target_modules=["conv2d", "lin"], init_r=3, total_step=10)),
], ids=["linear", "conv1d-defaults", "conv2d"])
def test_files_both_ways_and_merge(build, kwargs, tmp_path):
    hf, ours = _pair(tmp_path, build, **kwargs)
    inputs = model_inputs(build())
    expected = run(hf, inputs)
    assert_close(run(ours, inputs), expected, what="HF file -> peft_engine")
    ours.save_pretrained(tmp_path / "ours")
    assert_close(run(_quiet(peft.PeftModel.from_pretrained, build(), tmp_path / "ours"), inputs), expected,
                 what="peft_engine file -> HF PEFT")
    assert not any(k.endswith("ranknum") for k in load_file(tmp_path / "ours" / "adapter_model.safetensors"))
    ours.base_model.merge_adapter()
    assert_close(run(ours, inputs), expected, what="merged")
    ours.base_model.unmerge_adapter()
    assert_close(run(ours, inputs), expected, what="unmerged")


def test_training_loop_matches_hf(tmp_path):
    hf, ours = _pair(tmp_path, **SCHEDULE)
    batch = model_inputs(tiny_llama())
    batch["labels"] = batch["input_ids"]
    opt_hf = torch.optim.SGD([p for p in hf.parameters() if p.requires_grad], lr=0.5)
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.5)
    hf.train()
    ours.train()
    patterns = []
    for step in range(SCHEDULE["total_step"]):
        loss_hf, loss_ours = hf(**batch).loss, ours(**batch).loss
        assert_close(loss_ours.detach(), loss_hf.detach(), what=f"loss at step {step}")
        loss_hf.backward()
        loss_ours.backward()
        opt_hf.step()
        opt_ours.step()
        hf.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)
        opt_hf.zero_grad()
        opt_ours.zero_grad()
        expected = hf.peft_config["default"].rank_pattern
        got = ours.peft_config["default"].rank_pattern
        assert (got is None) == (expected is None), f"step {step}"
        if expected is not None:
            assert {k: list(v) for k, v in got.items()} == {k: list(v) for k, v in expected.items()}, f"step {step}"
            patterns.append(sum(map(sum, got.values())))
    assert patterns and patterns[-1] == SCHEDULE["target_r"] * 6 < patterns[0], "the budget must shrink to target"

    hf.eval()
    ours.eval()
    inputs = model_inputs(tiny_llama())
    assert_close(run(ours, inputs), run(hf, inputs), what="after training")
    hf.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")
    hf_file = load_file(tmp_path / "hf" / "adapter_model.safetensors")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(hf_file) == sorted(ours_file)
    for key, tensor in hf_file.items():
        assert ours_file[key].shape == tensor.shape, f"{key}: pruned shape"
        assert_close(ours_file[key], tensor, what=key)
    hf_config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert ours_config["rank_pattern"] == hf_config["rank_pattern"]
    assert all(".default" not in k for k in ours_config["rank_pattern"])

    # Pruned files load both ways: the layers shrink to the saved ranks first.
    reloaded = _quiet(pe.PeftModel.from_pretrained, tiny_llama(), tmp_path / "hf")
    ranks = {n: m.r["default"] for n, m in reloaded.named_modules() if isinstance(m, AdaLoraLayer)}
    assert sum(ranks.values()) == patterns[-1] and min(ranks.values()) < SCHEDULE["init_r"]
    expected = run(hf, inputs)
    assert_close(run(reloaded, inputs), expected, what="pruned HF file -> peft_engine")
    back = _quiet(peft.PeftModel.from_pretrained, tiny_llama(), tmp_path / "ours")
    assert_close(run(back, inputs), expected, what="pruned peft_engine file -> HF PEFT")


def test_orthogonal_regularizer_matches_hf_and_is_train_only(tmp_path):
    hf, ours = _pair(tmp_path, **SCHEDULE)
    batch = model_inputs(tiny_llama())
    batch["labels"] = batch["input_ids"]
    hf.train()
    ours.train()
    with torch.no_grad():
        hf_loss, ours_loss = hf(**batch).loss, ours(**batch).loss
    assert_close(ours_loss, hf_loss, what="train loss with the regulariser")
    ours.eval()
    with torch.no_grad():
        plain = ours(**batch).loss
    assert_close(plain + ours.base_model.orthogonal_regularization(), ours_loss, what="the regulariser term")
    assert ours.base_model.orthogonal_regularization() > 0


def test_budget_schedule_is_cubic():
    model = pe.get_peft_model(tiny_llama(), pe.AdaLoraConfig(target_modules=["q_proj", "v_proj"], init_r=6,
                                                             target_r=2, tinit=2, tfinal=3, total_step=15))
    allocator = model.base_model.rankallocator
    assert (allocator.init_bgt, allocator.target_bgt) == (24, 8)
    assert allocator.budget_schedule(2) == (24, False)
    assert allocator.budget_schedule(13) == (8, True)
    budget, _ = allocator.budget_schedule(6)
    assert budget == int(16 * (1 - 4 / 10) ** 3 + 8)


@pytest.mark.parametrize("kwargs,field", [
    ({"total_step": None}, "total_step"),
    ({"total_step": 10, "tinit": 5, "tfinal": 5}, "tinit"),
    ({"total_step": 10, "use_dora": True}, "use_dora"),
    ({"total_step": 10, "beta1": 1.0}, "beta1"),
    ({"total_step": 10, "orth_reg_weight": -1}, "orth_reg_weight"),
    ({"total_step": 10, "init_r": 0}, "init_r"),
])
def test_bad_config_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        pe.AdaLoraConfig(**kwargs)


def test_one_trainable_adapter_and_no_weighted_merge():
    model = pe.get_peft_model(tiny_llama(), pe.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    with pytest.raises(ValueError, match="one adapter at a time"):
        model.add_adapter("second", pe.AdaLoraConfig(target_modules=["q_proj"], total_step=5))
    model.add_adapter("frozen", pe.AdaLoraConfig(target_modules=["q_proj"], total_step=5, inference_mode=True))
    with pytest.raises(TypeError, match="add_weighted_adapter"):
        model.base_model.add_weighted_adapter(["default"], [1.0], "x")
    frozen = pe.get_peft_model(tiny_llama(), pe.AdaLoraConfig(target_modules=["q_proj"], total_step=5,
                                                              inference_mode=True))
    with pytest.raises(ValueError, match="trainable AdaLoRA adapter"):
        frozen.base_model.update_and_allocate(0)
