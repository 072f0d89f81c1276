"""Tests for sweeps.evaluate against hand computations on fake models whose logits are known."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sweeps.data import collate
from sweeps.evaluate import evaluate, macro_f1

VOCAB = 6
REPO = Path(__file__).resolve().parents[1]


class TableLM(nn.Module):
    """Logits at position t are a fixed row of a table picked by input_ids[t]; records grad mode."""

    def __init__(self, virtual_tokens: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = nn.Embedding(VOCAB, VOCAB)
        self.table.weight.data = torch.randn(VOCAB, VOCAB, generator=gen) * 2
        self.dropout = nn.Dropout(0.5)
        self.virtual_tokens = virtual_tokens
        self.grad_enabled: list[bool] = []
        self.was_training: list[bool] = []

    def forward(self, input_ids, attention_mask=None):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.was_training.append(self.training)
        logits = self.dropout(self.table(input_ids))
        if self.virtual_tokens:  # prompt learning prepends positions
            logits = torch.cat([torch.zeros(logits.shape[0], self.virtual_tokens, VOCAB), logits], dim=1)
        return type("Out", (), {"logits": logits})()


def hand_causal_loss(model: TableLM, batches) -> tuple[float, int]:
    """Sum over label tokens of -log softmax(table[input_ids[t-1]])[labels[t]], computed with math."""
    w = model.table.weight.tolist()
    total, count = 0.0, 0
    for batch in batches:
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            for t in range(1, len(ids)):
                if labels[t] == -100:
                    continue
                row = w[ids[t - 1]]
                log_z = math.log(sum(math.exp(v) for v in row))
                total += log_z - row[labels[t]]
                count += 1
    return total / count, count


CAUSAL_ROWS = [
    {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},
    {"input_ids": [2, 3], "labels": [-100, 3]},
    {"input_ids": [5, 4, 3, 2, 1, 0, 1], "labels": [-100, 4, 3, 2, 1, 0, 1]},
]


def causal_batches(pad_token_id: int = 0):
    return [collate(CAUSAL_ROWS[:2], pad_token_id=pad_token_id), collate(CAUSAL_ROWS[2:], pad_token_id=pad_token_id)]


def test_causal_loss_is_token_weighted_and_matches_hand_computation():
    model = TableLM()
    batches = causal_batches()
    expected, count = hand_causal_loss(model, batches)
    out = evaluate(model, batches, task="causal_lm")
    assert out["eval_tokens"] == count == 10
    assert out["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert out["perplexity"] == pytest.approx(math.exp(expected), rel=1e-6)
    per_batch = [hand_causal_loss(model, [b])[0] for b in batches]
    assert abs(sum(per_batch) / 2 - expected) > 1e-3, "a mean of batch means would differ"


def test_real_hf_model_matches_its_own_token_weighted_loss():
    """HF's causal-LM loss is also token-weighted within a batch, so one batch must agree exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(config).eval()
    batch = collate(CAUSAL_ROWS, pad_token_id=0)
    with torch.no_grad():
        reference = model(**batch).loss.item()
    assert evaluate(model, [batch], task="causal_lm")["eval_loss"] == pytest.approx(reference, rel=1e-5)


def test_padding_and_max_batches():
    model = TableLM()
    batches = causal_batches()
    first, _ = hand_causal_loss(model, batches[:1])
    assert evaluate(model, batches, task="causal_lm", max_batches=1)["eval_loss"] == pytest.approx(first, rel=1e-6)
    # padding with a real token id (as SmolLM2's pad == eos) changes nothing: labels there are -100
    repadded = causal_batches(pad_token_id=4)
    assert not torch.equal(repadded[0]["input_ids"], batches[0]["input_ids"])
    assert evaluate(model, repadded, task="causal_lm", max_batches=1)["eval_loss"] == pytest.approx(first, rel=1e-6)
    with pytest.raises(ValueError, match="max_batches=0"):
        evaluate(model, batches, task="causal_lm", max_batches=0)


def test_virtual_token_positions_are_dropped():
    batches = causal_batches()
    plain = evaluate(TableLM(), batches, task="causal_lm")["eval_loss"]
    assert evaluate(TableLM(virtual_tokens=3), batches, task="causal_lm")["eval_loss"] == pytest.approx(plain)


def test_eval_mode_no_grad_and_modes_restored():
    model = TableLM()
    model.train()
    model.dropout.eval()  # a submodule deliberately in eval mode must stay so
    before = evaluate(model, causal_batches(), task="causal_lm")["eval_loss"]
    assert model.grad_enabled == [False, False] and model.was_training == [False, False]
    assert model.training and not model.dropout.training and model.table.training
    assert evaluate(model, causal_batches(), task="causal_lm")["eval_loss"] == before  # dropout was off


def test_errors_are_clear():
    with pytest.raises(ValueError, match="task='lm'"):
        evaluate(TableLM(), causal_batches(), task="lm")
    empty = [collate([{"input_ids": [1, 2], "labels": [-100, -100]}], pad_token_id=0)]
    with pytest.raises(ValueError, match="no label tokens"):
        evaluate(TableLM(), empty, task="causal_lm")
    with pytest.raises(ValueError, match="labels"):
        evaluate(TableLM(), [{"input_ids": torch.tensor([[1, 2]])}], task="causal_lm")


# --------------------------------------------------------------------------- classification


class FixedClassifier(nn.Module):
    """Returns the logits row ``logits[input_ids[:, 0]]``: example i has id i."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = nn.Parameter(logits.clone(), requires_grad=False)

    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.logits[input_ids[:, 0]]}


def manual_cls(logits: list[list[float]], labels: list[int]) -> dict[str, float]:
    preds = [max(range(len(row)), key=row.__getitem__) for row in logits]
    loss = sum(math.log(sum(math.exp(v) for v in row)) - row[y] for row, y in zip(logits, labels)) / len(labels)
    accuracy = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    f1s = []
    for c in sorted(set(labels) | set(preds)):
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {"eval_loss": loss, "accuracy": accuracy, "f1": sum(f1s) / len(f1s)}


def cls_batches(labels: list[int], batch_size: int):
    rows = [{"input_ids": [i, 0, 0][: 1 + i % 3], "labels": y} for i, y in enumerate(labels)]
    return [collate(rows[i : i + batch_size], pad_token_id=0) for i in range(0, len(rows), batch_size)]


@pytest.mark.parametrize("classes", [2, 4])
def test_seq_cls_metrics_match_manual_computation(classes):
    gen = torch.Generator().manual_seed(classes)
    n = 23
    logits = torch.randn(n, classes, generator=gen)
    labels = torch.randint(0, classes - 1 if classes > 2 else classes, (n,), generator=gen).tolist()  # 4: class 3 unseen
    expected = manual_cls(logits.tolist(), labels)
    out = evaluate(FixedClassifier(logits), cls_batches(labels, 5), task="seq_cls")
    assert out["eval_examples"] == n
    for key in ("eval_loss", "accuracy", "f1"):
        assert out[key] == pytest.approx(expected[key], rel=1e-6), key


def test_macro_f1_edge_cases():
    # class 2 never true nor predicted: excluded; class 1 true but never predicted: F1 0 counts
    confusion = torch.tensor([[3, 0, 0], [2, 0, 0], [0, 0, 0]])
    assert macro_f1(confusion) == pytest.approx((2 * 3 / (2 * 3 + 2) + 0.0) / 2)
    assert macro_f1(torch.eye(3) * 5) == 1.0
    assert macro_f1(torch.zeros(2, 2)) == 0.0


def test_seq_cls_label_out_of_range_is_clear():
    model = FixedClassifier(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="label ids"):
        evaluate(model, cls_batches([0, 1, 2], 3), task="seq_cls")


# --------------------------------------------------------------------------- distributed

# Each rank is a fresh interpreter importing only torch and sweeps.evaluate (fast to start).
_RANK_SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from sweeps.evaluate import evaluate

rank, world, init, spec_path, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
spec = json.load(open(spec_path))
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)

class Fixed(torch.nn.Module):
    def __init__(self, logits, per_token):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits), requires_grad=False)
        self.per_token = per_token
    def forward(self, input_ids, attention_mask=None):
        return {"logits": self.logits[input_ids] if self.per_token else self.logits[input_ids[:, 0]]}

def batches(rows, size):
    mine = rows[rank::world]
    return [{k: torch.tensor([r[k] for r in mine[i:i + size]]) for k in ("input_ids", "labels")}
            for i in range(0, len(mine), size)]

cls = evaluate(Fixed(spec["cls_logits"], False), batches(spec["cls_rows"], 2), task="seq_cls")
lm = evaluate(Fixed(spec["lm_table"], True), batches(spec["lm_rows"], 1), task="causal_lm")
json.dump({"cls": cls, "lm": lm}, open(out_path, "w"))
dist.destroy_process_group()
"""


def test_distributed_figures_are_global(tmp_path):
    """Two gloo ranks with uneven shards (and batch counts) both return the single-process figure."""
    labels = [0, 1, 2, 1, 0, 2, 2, 1, 0]
    logits = torch.randn(len(labels), 3, generator=torch.Generator().manual_seed(5))
    lm = TableLM()
    lm_rows = [{"input_ids": r["input_ids"][:2], "labels": r["labels"][:2]} for r in CAUSAL_ROWS]
    lm_rows += [{"input_ids": [3, 1], "labels": [-100, 1]}]
    spec = {
        "cls_logits": logits.tolist(),
        "cls_rows": [{"input_ids": [i], "labels": y} for i, y in enumerate(labels)],
        "lm_table": lm.table.weight.tolist(),
        "lm_rows": lm_rows,
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RANK_SCRIPT, str(rank), "2", f"file://{tmp_path / 'store'}",
             str(tmp_path / "spec.json"), str(tmp_path / f"out{rank}.json")],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        for rank in (0, 1)
    ]
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], errors
    expected = manual_cls(logits.tolist(), labels)
    lm_batches = [collate([r], pad_token_id=0) for r in lm_rows]
    lm_expected, lm_count = hand_causal_loss(lm, lm_batches)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"out{rank}.json").read_text())
        for key in ("eval_loss", "accuracy", "f1"):
            assert got["cls"][key] == pytest.approx(expected[key], rel=1e-6), (rank, key)
        assert got["cls"]["eval_examples"] == len(labels)
        assert got["lm"]["eval_loss"] == pytest.approx(lm_expected, rel=1e-6)
        assert got["lm"]["eval_tokens"] == lm_count == 3
