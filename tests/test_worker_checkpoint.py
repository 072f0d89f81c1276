"""A trial's adapter-only checkpoint round trip, as a retried trial or a PBT exploit restores it."""

from __future__ import annotations

import json

import torch

from peft_engine import LoraConfig, get_peft_model
from sweeps.worker import TRAINER_STATE, _restore, _save_checkpoint, _schedule, make_adamw
from tests.conftest import VOCAB, tiny_llama


def _trial(lr: float, weight_decay: float, total: int = 10):
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(params, lr, weight_decay)  # fused, as the worker's
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule("linear", 0.0, total))
    return model, optimizer, scheduler


def test_restore_continues_the_adapter_and_moments_with_this_trials_hyperparameters(tmp_path):
    model, optimizer, scheduler = _trial(lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, VOCAB, (2, 8))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    _save_checkpoint(tmp_path, model, optimizer, 3, {"eval_loss": 1.5, "step": 3}, {"method": "lora"})
    assert json.loads((tmp_path / TRAINER_STATE).read_text())["step"] == 3

    # A PBT exploit: another trial (new learning rate and weight decay) continues this checkpoint.
    clone, clone_optimizer, clone_scheduler = _trial(lr=1e-3, weight_decay=0.1)
    step, metrics = _restore(str(tmp_path), clone, clone_optimizer, clone_scheduler, weight_decay=0.1)
    assert (step, metrics["eval_loss"]) == (3, 1.5)
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, param in clone.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, saved[name], rtol=0, atol=0)
    moments = [s["exp_avg"] for s in optimizer.state.values()]
    torch.testing.assert_close([s["exp_avg"] for s in clone_optimizer.state.values()], moments, rtol=0, atol=0)
    group = clone_optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1
    assert abs(group["lr"] - 1e-3 * (1 - 3 / 10)) < 1e-12  # this trial's lr, on the schedule at step 3


def test_no_checkpoint_starts_at_step_zero():
    model, optimizer, scheduler = _trial(lr=1e-3, weight_decay=0.0)
    assert _restore(None, model, optimizer, scheduler, weight_decay=0.0) == (0, None)


def test_a_warm_base_starts_the_job_as_its_own_load_would():
    """The pool's pre-loaded base: same weights and the same RNG state (so the same adapter init)."""
    from pathlib import Path

    from sweeps.space import load_space
    from sweeps.worker import load_trial_base, warm_base

    spec = load_space(Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml")
    cpu = torch.device("cpu")
    warm = warm_base(spec, cpu)
    torch.manual_seed(123)  # whatever ran in between, taking the base restores the RNG a load leaves
    model = warm.take("none")
    after_warm = torch.rand(4)
    fresh = load_trial_base(spec, "none", cpu)
    after_load = torch.rand(4)
    torch.testing.assert_close(after_warm, after_load, rtol=0, atol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert warm.take("none") is None, "a warm base is handed out once"
    other = warm_base(spec, cpu)
    assert other.take("nf4") is None and other.model is None, "a base of another quantization is let go"
