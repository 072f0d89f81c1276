"""sweeps.loss: the label-token loss equals the model's own loss and gradients, or is not used."""

from __future__ import annotations

import pytest
import torch

import peft_engine as pe
from sweeps.data import collate
from sweeps.evaluate import _causal_sums, evaluate
from sweeps.loss import TrainingLoss, label_token_plan
from tests.conftest import _LLAMA_LIKE, VOCAB, _build, tiny_gpt2, tiny_llama


def sft_batch(seed: int = 3) -> dict[str, torch.Tensor]:
    """Rows of different lengths, the loss on each row's tail only (as chat SFT's response)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in ((9, 5), (6, 2), (12, 8)):
        ids = torch.randint(2, VOCAB, (length,), generator=gen)
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(length, dtype=torch.long)})
    return collate(rows, pad_token_id=0)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("make_config", [
    lambda: pe.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian"),
    lambda: pe.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights="gaussian"),
    pe.IA3Config,
], ids=["lora", "dora", "ia3"])
def test_label_token_loss_matches_the_models_own_loss_and_gradients(build, make_config):
    model = pe.get_peft_model(build(), make_config())
    model.train()
    batch = sft_batch()
    torch.manual_seed(7)  # GPT-2 trains with dropout: the same draws on both paths
    own = model(**batch).loss
    own.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    # Unpacked: GPT-2's dropout draws depend on the batch's layout (packing: tests/test_packing.py).
    loss_module = TrainingLoss(model, padding_free=False)
    assert loss_module.plan is not None, "the split should apply to a plain decoder with a linear head"
    torch.manual_seed(7)
    ours = loss_module(**batch)
    ours.backward()
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_adalora_keeps_its_orthogonality_term_in_training_only():
    model = pe.get_peft_model(tiny_llama(), pe.AdaLoraConfig(init_r=4, target_r=2, total_step=10))
    loss_module = TrainingLoss(model)
    batch = sft_batch()
    model.train()
    torch.testing.assert_close(loss_module(**batch), model(**batch).loss)
    reg = model.base_model.orthogonal_regularization()
    assert reg.item() > 0
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loss_module(**batch), model(**batch).loss)


def test_prompt_learning_keeps_the_full_forward():
    model = pe.get_peft_model(tiny_llama(), pe.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    assert label_token_plan(model) is None
    loss_module = TrainingLoss(model)
    batch = sft_batch()
    torch.testing.assert_close(loss_module(**batch), model(**batch).loss)


def test_a_head_with_softcapping_is_detected_by_the_probe():
    """Gemma2 caps its logits after the head: the body/head split would give another loss."""
    model = _build("Gemma2Config", "Gemma2ForCausalLM", 0, **_LLAMA_LIKE, head_dim=8, final_logit_softcapping=0.5)
    assert label_token_plan(model) is None
    plain = _build("Gemma2Config", "Gemma2ForCausalLM", 0, **_LLAMA_LIKE, head_dim=8, final_logit_softcapping=None)
    assert label_token_plan(plain) is not None


def test_evaluate_through_the_plan_equals_full_logits():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(r=4, init_lora_weights="gaussian"))
    batches = [sft_batch(seed) for seed in (3, 4, 5)]
    assert label_token_plan(model) is not None
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            s, n = _causal_sums(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
            total, count = total + s.item(), count + n.item()
    metrics = evaluate(model, batches, task="causal_lm")
    assert metrics["eval_tokens"] == count
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-6)
