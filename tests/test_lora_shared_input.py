"""LoRA siblings that read one input (peft_engine/tuners/lora/shared_input.py).

The grouped node must give the outputs and every gradient of the members run one by one (and
of HF PEFT), group only siblings that really are called on the same tensor, switch itself off
where they are not (cross-attention, a member never called), and leave every non-plain case
(dropout, DoRA, hooks, inference, mixed adapters) to the one-layer paths.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import peft_engine as pe
from peft_engine.tuners.lora.shared_input import groups_in
from tests.conftest import (
    assert_close,
    hf_config,
    input_ids,
    output_and_grads,
    perturb_adapters,
    tiny_bart,
    tiny_llama,
    tiny_t5,
)


class _Attention(nn.Module):
    """q/k/v with biases and unequal widths; ``cross`` feeds k and v another tensor, as cross-attention does."""

    def __init__(self, cross: bool = False, call_v: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(12, 8), nn.Linear(12, 4), nn.Linear(12, 4)
        self.cross, self.call_v = cross, call_v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv_input = x.flip(-1) if self.cross else x
        out = self.q_proj(x).sum(-1, keepdim=True) * self.k_proj(kv_input)
        return out + self.v_proj(kv_input) if self.call_v else out


def _ungrouped(model: nn.Module) -> nn.Module:
    reference = copy.deepcopy(model)
    for group in groups_in(reference):
        group.enabled = False
    return reference


def _assert_same_step(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    """Same outputs and gradients up to float32 rounding (the toy model's outputs reach ~100)."""
    out, grads = output_and_grads(model, x)
    ref_out, ref_grads = output_and_grads(reference, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        if ref_grads[name] is None:  # a member the model never called gets no gradient, grouped or not
            assert grad is None, name
            continue
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def _adapted(module: nn.Module, **kwargs) -> nn.Module:
    config = pe.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=3, lora_alpha=5, **kwargs)
    model = pe.get_peft_model(module, config)
    perturb_adapters(model)
    return model


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts grouped computations."""
    from peft_engine.tuners.lora import shared_input

    calls: list[int] = []
    real = shared_input.shared_input_lora
    monkeypatch.setattr(shared_input, "shared_input_lora", lambda x, ops: calls.append(len(ops)) or real(x, ops))
    return calls


def test_grouped_step_equals_one_layer_at_a_time(monkeypatch):
    model = _adapted(_Attention(), rank_pattern={"k_proj": 5}, alpha_pattern={"v_proj": 2}, use_rslora=True)
    model.train()
    (group,) = groups_in(model)
    assert [m.out_features for m in group.members] == [8, 4, 4]
    calls = _calls(monkeypatch)
    x = torch.randn(2, 3, 12)
    _assert_same_step(model, _ungrouped(model), x)
    assert calls == [3] and group.enabled and group._pending is None


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj"], ["q_proj", "v_proj"]])
def test_llama_training_step_equals_hf_peft(targets, monkeypatch):
    import peft

    config = pe.LoraConfig(target_modules=targets, r=4, lora_alpha=8)
    ours = pe.get_peft_model(tiny_llama(), config)
    perturb_adapters(ours)
    hf = peft.get_peft_model(tiny_llama(), hf_config(config))
    peft.set_peft_model_state_dict(hf, pe.get_peft_model_state_dict(ours))
    assert len(groups_in(ours)) == 2 * (2 if "gate_proj" in targets else 1)  # per block: q/k/v (or q/v), gate/up
    calls = _calls(monkeypatch)
    ids = input_ids()
    losses, grads = [], []
    for model in (ours, hf):
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n.replace(".default", ""): p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert len(calls) == len(groups_in(ours))
    assert_close(losses[0], losses[1], 1e-5, "loss")
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert_close(grad, grads[1][name], 1e-5, f"grad of {name}")


def test_gradient_checkpointing_recomputes_grouped(monkeypatch):
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules="all-linear", r=4, lora_alpha=8))
    perturb_adapters(model)
    reference = _ungrouped(model)
    ids = input_ids()
    losses, grads = [], []
    for m, reentrant in ((model, False), (reference, False), (copy.deepcopy(model), True)):
        m.train()
        m.get_base_model().gradient_checkpointing_enable({"use_reentrant": reentrant})
        m.enable_input_require_grads()
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    for loss, grad in zip(losses[1:], grads[1:]):
        assert_close(losses[0], loss, 1e-5, "loss")
        for name, g in grad.items():
            assert_close(grads[0][name], g, 1e-5, f"grad of {name}")
    assert all(g.enabled for g in groups_in(model))


@pytest.mark.parametrize("module", [_Attention(cross=True), _Attention(call_v=False)], ids=["cross-input", "member-not-called"])
def test_siblings_that_do_not_share_an_input_switch_the_group_off(module, monkeypatch):
    model = _adapted(module)
    model.train()
    reference = _ungrouped(model)
    (group,) = groups_in(model)
    calls = _calls(monkeypatch)
    x = torch.randn(2, 3, 12)
    for _ in range(3):  # outputs and gradients stay right before, while and after the group gives up
        _assert_same_step(model, reference, x)
        for p in list(model.parameters()) + list(reference.parameters()):
            p.grad = None
    assert not group.enabled and group._pending is None
    assert len(calls) <= 2


@pytest.mark.parametrize("model_fn", [tiny_t5, tiny_bart])
def test_encoder_decoder_cross_attention_trains_right(model_fn):
    """T5 and BART call k/v of cross-attention on the encoder's states: those groups switch off."""
    config = pe.LoraConfig(target_modules=["q", "k", "v"] if model_fn is tiny_t5 else ["q_proj", "k_proj", "v_proj"],
                           r=4, lora_alpha=8)
    model = pe.get_peft_model(model_fn(), config)
    perturb_adapters(model)
    reference = _ungrouped(model)
    ids = input_ids()
    results = []
    for m in (model, reference):
        m.eval()  # no dropout in the base (the groups need autograd recording, not training mode)
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    assert_close(results[0][0], results[1][0], 1e-5, "loss")
    for name, grad in results[0][1].items():
        assert_close(grad, results[1][1][name], 1e-5, f"grad of {name}")
    groups = groups_in(model)
    assert any(g.enabled for g in groups) and not all(g.enabled for g in groups)  # self-attention keeps grouping


@pytest.mark.parametrize("case", ["dropout", "dora", "hook", "no_grad", "disabled", "two_adapters", "mixed_batch"])
def test_non_plain_cases_run_one_layer_at_a_time(case, monkeypatch):
    kwargs = {"lora_dropout": 0.5} if case == "dropout" else {"use_dora": True} if case == "dora" else {}
    model = _adapted(_Attention(), **kwargs)
    model.train()
    layers = groups_in(model)[0].members
    if case == "hook":
        layers[1].base_layer.register_forward_hook(lambda *args: None)
    if case in ("two_adapters", "mixed_batch"):
        model.add_adapter("other", pe.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=2))
        if case == "two_adapters":
            model.base_model.set_adapter(["default", "other"])
    calls = _calls(monkeypatch)
    x = torch.randn(2, 3, 12, requires_grad=True)
    if case == "no_grad":
        with torch.no_grad():
            model(x)
    elif case == "disabled":
        with model.disable_adapter():
            model(x).sum().backward()
    elif case == "mixed_batch":
        model(x, adapter_names=["default", "other"]).sum().backward()
    else:
        model(x).sum().backward()
    assert calls == []


def test_member_whose_adapter_changed_after_the_group_ran_computes_alone():
    model = _adapted(_Attention())
    model.add_adapter("other", pe.LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], r=2, init_lora_weights=False))
    model.train()
    q, k, _ = groups_in(model)[0].members
    x = torch.randn(2, 3, 12, requires_grad=True)
    q(x)  # computes and keeps k's and v's outputs with adapter "default"
    k.set_adapter("other")
    expected = _ungrouped(model).base_model.model.k_proj(x)
    assert_close(k(x), expected, 1e-6, "k after set_adapter")


def test_copies_and_pickles_drop_outputs_in_flight():
    model = _adapted(_Attention())
    model.train()
    q = groups_in(model)[0].members[0]
    q(torch.randn(2, 3, 12, requires_grad=True))  # k and v's outputs are now kept, holding graph tensors
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        (group,) = groups_in(clone)
        assert group._pending is None and group.members[0] is clone.base_model.model.q_proj
        _assert_same_step(clone, _ungrouped(model), torch.randn(2, 3, 12))
