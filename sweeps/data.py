"""Datasets for the sweeps: load, split deterministically, tokenize, pad, shard.

Every trial of a sweep, and the registry's champion-vs-candidate gate, must see the *same*
eval examples, otherwise their eval losses are not comparable. So the split is done on the
raw rows (before tokenization, so ``seq_len`` or the tokenizer cannot move examples between
train and eval) and only from ``seed``: each Ray Train worker can call
:func:`build_datasets` itself and gets identical splits without any coordination.

Sources:

* ``"chatterbot-corpus"`` — the English part of the ``chatterbot-corpus`` package, found
  through the installed package (never the network). Each YAML conversation
  ``[s0, s1, s2, ...]`` is a chain of replies, so it gives the pairs ``(s0, s1), (s1, s2), ...``
  as ``prompt``/``response``. Exact duplicate pairs are dropped (``tech_support.yml`` repeats a
  handful of pairs over a hundred times each; keeping them would put copies of training
  examples into the eval split). Non-list conversations (one malformed entry in
  ``trivia.yml``) are skipped; non-string statements are coerced with ``str``.
* a local ``.json``/``.jsonl``/``.csv``/``.parquet`` file, read by ``datasets.load_dataset``.
* anything else is a Hugging Face Hub dataset id (``split="train"``). Offline machines must
  fail fast, so the Hub's host is probed with a short timeout first.

Rows whose needed fields are ``None`` or blank are dropped (counted in ``DatasetSplits.stats``).
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import logging
import math
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
import yaml
from datasets import ClassLabel, Dataset, load_dataset
from datasets import config as ds_config
from torch.utils.data import DataLoader, DistributedSampler, Sampler

log = logging.getLogger(__name__)

CHATTERBOT_SOURCE = "chatterbot-corpus"
TASKS = ("causal_lm", "seq_cls")
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
IGNORE_INDEX = -100
MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class DatasetSplits:
    """Tokenized train/eval splits, torch-formatted with columns ``MODEL_COLUMNS``.

    ``num_labels``/``label_names`` are set for ``seq_cls`` only (label id ``i`` is
    ``label_names[i]``). ``pad_token_id`` is what :func:`collate` should pad ``input_ids`` with.
    ``stats`` counts rows at each stage (loaded, dropped as blank, dropped as truncated, ...).
    """

    train: Dataset
    eval: Dataset
    num_labels: int | None = None
    label_names: list[str] | None = None
    pad_token_id: int = 0
    stats: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- loading


# libyaml's safe loader when present: the same safe constructor as yaml.safe_load, ~10x faster
# (pure-Python parsing of the corpus is ~1.4 s of a ~2 s build).
_YAML_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_chatterbot_pairs(language: str = "english") -> list[dict[str, str]]:
    """Prompt/response pairs from the installed ``chatterbot-corpus`` package (see module doc)."""
    return [dict(pair) for pair in _chatterbot_pairs(language)]


@functools.lru_cache(maxsize=4)
def _chatterbot_pairs(language: str) -> tuple[dict[str, str], ...]:
    if importlib.util.find_spec("chatterbot_corpus") is None:
        raise ValueError(
            f"source={CHATTERBOT_SOURCE!r} needs the chatterbot-corpus package: "
            "pip install --no-deps chatterbot-corpus==1.3.3"
        )
    folder = importlib.resources.files("chatterbot_corpus") / "data" / language
    if not folder.is_dir():
        raise ValueError(f"chatterbot-corpus has no language {language!r}")
    pairs: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith((".yml", ".yaml")):
            continue
        doc = yaml.load(entry.read_text(encoding="utf-8"), Loader=_YAML_SAFE_LOADER) or {}
        for conversation in doc.get("conversations") or []:
            if not isinstance(conversation, list):
                continue
            turns = [_as_text(t) for t in conversation]
            for prompt, response in zip(turns, turns[1:]):
                if prompt is None or response is None or (prompt, response) in seen:
                    continue
                seen.add((prompt, response))
                pairs.append({"prompt": prompt, "response": response})
    if not pairs:
        raise ValueError(f"chatterbot-corpus ({folder}) gave no prompt/response pairs")
    return tuple(pairs)


def load_raw(source: str) -> Dataset:
    """The untokenized rows of ``source`` (chatterbot corpus, local file or Hub id)."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"source={source!r} must be {CHATTERBOT_SOURCE!r}, a local file or a Hub dataset id")
    if source == CHATTERBOT_SOURCE:
        return Dataset.from_list(load_chatterbot_pairs())
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_FORMATS or path.exists() or source.startswith((".", "/", "~")):
        if suffix not in LOCAL_FORMATS:
            raise ValueError(
                f"source={source!r}: local files must end in one of {', '.join(sorted(LOCAL_FORMATS))}"
            )
        if not path.is_file():
            raise ValueError(f"source={source!r}: no such file ({path.resolve()})")
        return load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    return _load_hub(source)


def _load_hub(dataset_id: str) -> Dataset:
    """``load_dataset(id, split="train")``, failing within seconds when the Hub is unreachable."""
    offline = bool(ds_config.HF_HUB_OFFLINE)  # datasets' own view (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)
    if not offline:
        _probe_hub(dataset_id)
    try:
        return load_dataset(dataset_id, split="train")
    except Exception as exc:  # datasets raises many types; one clear message for all
        mode = "offline mode, so only a cached copy can be used" if offline else "online"
        raise ValueError(
            f"source={dataset_id!r} is not {CHATTERBOT_SOURCE!r} or an existing local file, and loading it "
            f"as a Hub dataset failed ({mode}): {type(exc).__name__}: {exc}"
        ) from exc


def _probe_hub(dataset_id: str) -> None:
    """Raise quickly if the Hub endpoint cannot be reached (datasets itself retries for ~30 s)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # a proxy decides reachability; let datasets try

    url = urlparse(ds_config.HF_ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        raise ValueError(
            f"source={dataset_id!r} is not {CHATTERBOT_SOURCE!r} or an existing local file, and the "
            f"Hugging Face Hub ({host}:{port}) is unreachable: {exc}. Use a local .json/.jsonl/.csv/.parquet "
            "file, or set HF_HUB_OFFLINE=1 to use a cached copy."
        ) from exc


def _as_text(value: Any) -> str | None:
    """A field as stripped text; None for missing/blank (those rows are dropped)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):  # pandas' missing value in CSVs
        return None
    text = value if isinstance(value, str) else str(value)
    text = text.strip()
    return text or None


def _clean_label(value: Any) -> Any:
    """Strip string labels; NaN (pandas' missing number) and blanks become None (row dropped)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str):
        return value.strip() or None
    return value


def _require_columns(ds: Dataset, source: str, fields: dict[str, str]) -> None:
    for param, column in fields.items():
        if column not in ds.column_names:
            raise ValueError(
                f"{param}={column!r} is not a column of source {source!r}; "
                f"available columns: {', '.join(ds.column_names)}"
            )


# --------------------------------------------------------------------------- tokenization


def resolve_pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked out either way)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _chat_template_check(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"task='causal_lm' tokenizes with the tokenizer's chat template, but "
            f"{type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')}) has no chat_template; "
            "use an instruct/chat tokenizer or set tokenizer.chat_template"
        )


def _tokenize_causal(
    ds: Dataset, tokenizer: Any, *, seq_len: int, prompt_field: str, response_field: str, system_prompt: str | None
) -> Dataset:
    """Chat-template SFT rows: loss only on the assistant turn (prompt tokens are IGNORE_INDEX).

    The boundary is the tokenization of the prompt rendered with ``add_generation_prompt=True``;
    it must be a token prefix of the full conversation's tokenization, else the mask would be
    wrong and we refuse. Rendered text is tokenized with ``add_special_tokens=False`` because
    chat templates write their own BOS. Rows whose response is fully truncated are dropped.
    """
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        prompts = [head + [{"role": "user", "content": p}] for p in batch[prompt_field]]
        fulls = [c + [{"role": "assistant", "content": r}] for c, r in zip(prompts, batch[response_field])]
        prompt_text = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(fulls, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        out: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
        for p_text, f_text, p_ids, f_ids in zip(prompt_text, full_text, prompt_ids, full_ids):
            n = len(p_ids)
            if not f_text.startswith(p_text) or f_ids[:n] != p_ids:
                where = "rendered text" if not f_text.startswith(p_text) else "token ids"
                raise ValueError(
                    "the tokenizer's chat template is not prefix-stable: the prompt rendered with "
                    f"add_generation_prompt=True is not a prefix ({where}) of the full conversation, so the "
                    f"prompt tokens cannot be masked. prompt: {p_text!r}; full: {f_text!r}"
                )
            ids = f_ids[:seq_len]
            if len(ids) <= n:
                continue  # nothing of the response survives truncation
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append([IGNORE_INDEX] * n + ids[n:])
        return out

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="chat SFT")


def _label_mapping(
    ds: Dataset, label_field: str, class_names: list[str] | None = None
) -> tuple[list[str], dict[Any, int]]:
    """Label names and value -> id; ClassLabel columns keep their ids, other values are sorted."""
    if class_names is not None:
        return list(class_names), {i: i for i in range(len(class_names))}
    values = set(ds.unique(label_field)) - {None}
    numeric = all(isinstance(v, (bool, int, float)) for v in values)
    if numeric:
        bad = [v for v in values if isinstance(v, float) and not float(v).is_integer()]
        if bad:
            raise ValueError(
                f"label_field={label_field!r} has non-integer values (e.g. {bad[0]!r}); "
                "seq_cls needs class labels (integers or strings)"
            )
        ordered = sorted(values, key=float)
        names = [str(int(v)) for v in ordered]
    else:
        ordered = sorted(values, key=str)
        names = [str(v) for v in ordered]
    if len(ordered) < 2:
        raise ValueError(f"label_field={label_field!r} has {len(ordered)} distinct value(s) {names}; need >= 2")
    return names, {v: i for i, v in enumerate(ordered)}


def _tokenize_seq_cls(
    ds: Dataset, tokenizer: Any, *, seq_len: int, text_field: str, label_field: str, label_ids: dict[Any, int]
) -> Dataset:
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch[text_field], truncation=True, max_length=seq_len)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": [label_ids[v] for v in batch[label_field]],
        }

    return ds.map(tokenize, batched=True, remove_columns=ds.column_names, keep_in_memory=True, desc="classification")


# --------------------------------------------------------------------------- public entry point


def split_rows(
    raw: Dataset, *, seed: int, eval_size: int, max_train_examples: int | None = None
) -> tuple[Dataset, Dataset]:
    """The deterministic (train, eval) split of raw rows: a function of ``seed`` and the row order only."""
    split = raw.shuffle(seed=seed).train_test_split(test_size=eval_size, seed=seed)
    train, evals = split["train"], split["test"]
    if max_train_examples is not None and len(train) > max_train_examples:
        train = train.select(range(max_train_examples))
    return train, evals


def build_datasets(
    source: str,
    *,
    tokenizer: Any,
    task: str = "causal_lm",
    seq_len: int = 128,
    seed: int = 0,
    eval_size: int = 64,
    prompt_field: str = "prompt",
    response_field: str = "response",
    text_field: str = "text",
    label_field: str = "label",
    system_prompt: str | None = None,
    max_train_examples: int | None = None,
) -> DatasetSplits:
    """Load ``source``, split it by ``seed`` and tokenize both splits for ``task`` (see module doc).

    The split (shuffle with ``seed``, then ``train_test_split(test_size=eval_size, seed=seed)``)
    happens on raw rows; ``max_train_examples`` then caps the train split. ``causal_lm`` may
    drop rows whose response does not fit in ``seq_len``, so a split can end up slightly smaller.
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(TASKS)}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 2")
    if not isinstance(eval_size, int) or isinstance(eval_size, bool) or eval_size < 1:
        raise ValueError(f"eval_size={eval_size!r} must be an integer >= 1")
    if max_train_examples is not None and (not isinstance(max_train_examples, int) or max_train_examples < 1):
        raise ValueError(f"max_train_examples={max_train_examples!r} must be None or an integer >= 1")
    if task == "causal_lm":
        _chat_template_check(tokenizer)
        fields = {"prompt_field": prompt_field, "response_field": response_field}
    else:
        fields = {"text_field": text_field, "label_field": label_field}

    raw = load_raw(source)
    _require_columns(raw, source, fields)
    stats = {"rows_loaded": len(raw)}
    raw = raw.select_columns(list(fields.values()))
    text_columns = list(fields.values()) if task == "causal_lm" else [text_field]
    # A ClassLabel column (Hub datasets, parquet written by datasets) keeps its names; read them
    # before cleaning, which re-infers the column type. Its missing value is -1.
    feature = raw.features.get(label_field) if task == "seq_cls" else None
    class_names = list(feature.names) if isinstance(feature, ClassLabel) else None

    def clean(batch: dict[str, list]) -> dict[str, list]:
        out = {c: [_as_text(v) for v in batch[c]] for c in text_columns}
        if task == "seq_cls":
            out[label_field] = [
                None if class_names is not None and v is not None and v < 0 else _clean_label(v)
                for v in batch[label_field]
            ]
        return out

    raw = raw.map(clean, batched=True, keep_in_memory=True, desc="clean")
    raw = raw.filter(
        lambda b: [all(b[c][i] is not None for c in fields.values()) for i in range(len(b[text_columns[0]]))],
        batched=True, keep_in_memory=True, desc="drop blank",
    )
    stats["rows_blank_dropped"] = stats["rows_loaded"] - len(raw)
    if eval_size >= len(raw):
        raise ValueError(f"eval_size={eval_size} leaves no training rows: source {source!r} has {len(raw)} usable rows")

    names = label_ids = None
    if task == "seq_cls":
        names, label_ids = _label_mapping(raw, label_field, class_names)

    train, evals = split_rows(raw, seed=seed, eval_size=eval_size, max_train_examples=max_train_examples)
    stats.update(train_rows=len(train), eval_rows=len(evals))

    out = []
    for part in (train, evals):
        if task == "causal_lm":
            tok = _tokenize_causal(
                part, tokenizer, seq_len=seq_len, prompt_field=prompt_field,
                response_field=response_field, system_prompt=system_prompt,
            )
        else:
            tok = _tokenize_seq_cls(
                part, tokenizer, seq_len=seq_len, text_field=text_field, label_field=label_field, label_ids=label_ids
            )
        tok.set_format(type="torch", columns=MODEL_COLUMNS)
        out.append(tok)
    stats["train_truncated_dropped"] = len(train) - len(out[0])
    stats["eval_truncated_dropped"] = len(evals) - len(out[1])
    if len(out[0]) == 0 or len(out[1]) == 0:
        raise ValueError(f"seq_len={seq_len} is too short: every response in a split was truncated away ({stats})")
    if stats["train_truncated_dropped"] or stats["eval_truncated_dropped"]:
        log.warning("seq_len=%d truncated away some responses: %s", seq_len, stats)
    return DatasetSplits(
        train=out[0], eval=out[1], num_labels=len(names) if names else None, label_names=names,
        pad_token_id=resolve_pad_token_id(tokenizer), stats=stats,
    )


# --------------------------------------------------------------------------- batching


def collate(batch: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row: ``input_ids`` with ``pad_token_id``, labels with -100.

    Scalar labels (classification) are stacked instead. ``attention_mask`` marks real tokens,
    so a pad id that equals eos (SmolLM2) is still told apart from a real eos.
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id=None; pass resolve_pad_token_id(tokenizer)")
    rows = [torch.as_tensor(ex["input_ids"], dtype=torch.long) for ex in batch]
    width = max(r.numel() for r in rows)
    input_ids = torch.full((len(rows), width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ex, row) in enumerate(zip(batch, rows)):
        input_ids[i, : row.numel()] = row
        mask = ex.get("attention_mask")
        attention_mask[i, : row.numel()] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "labels" in batch[0]:
        labels = [torch.as_tensor(ex["labels"], dtype=torch.long) for ex in batch]
        if labels[0].dim() == 0:
            out["labels"] = torch.stack(labels)
        else:
            padded = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
            for i, lab in enumerate(labels):
                padded[i, : lab.numel()] = lab
            out["labels"] = padded
    return out


class _ExactShardSampler(Sampler[int]):
    """Rank ``r`` gets rows ``r, r + world_size, ...`` in order, with no padding.

    For evaluation: DistributedSampler repeats rows to even out ranks, which would count
    them twice in the global eval figures. Ranks may get one batch fewer than others, which
    is safe because :func:`sweeps.evaluate.evaluate` only communicates after its loop.

    With ``lengths``, rows go longest first, so each batch pads to about its own rows' length
    (on the packaged Q/A data, 64 eval rows in batches of 4: 3,592 tokens instead of 4,704).
    """

    def __init__(self, length: int, rank: int, world_size: int, lengths: Sequence[int] | None = None) -> None:
        order = sorted(range(length), key=lambda i: -lengths[i]) if lengths is not None else range(length)
        self.indices = list(order)[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:  # same interface as DistributedSampler
        pass


def make_loader(
    dataset: Sequence | Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    pad_token_id: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    exact_shards: bool = False,
    by_length: bool = False,
) -> DataLoader:
    """A DataLoader over this rank's shard, padded per batch by :func:`collate`.

    By default the shard comes from ``DistributedSampler(seed=seed)``, which gives every rank
    the same number of batches (needed for DDP training); call ``loader.sampler.set_epoch(e)``
    each epoch to reshuffle. ``exact_shards=True`` (eval only, ``shuffle`` must be False) splits
    rows without repeating any, so all-reduced eval metrics count each row exactly once;
    ``by_length=True`` with it orders the rows longest first (sums over rows do not depend on order).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size")
    if exact_shards:
        if shuffle or drop_last:
            raise ValueError("exact_shards=True is for evaluation: shuffle and drop_last must be False")
        lengths = [len(ids) for ids in dataset["input_ids"]] if by_length else None
        sampler: Sampler[int] = _ExactShardSampler(len(dataset), rank, world_size, lengths)
    else:
        if by_length:
            raise ValueError("by_length=True needs exact_shards=True (training batches stay shuffled)")
        sampler = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        collate_fn=functools.partial(collate, pad_token_id=pad_token_id),
    )


def make_eval_loader(splits: DatasetSplits, spec: Any, *, rank: int = 0, world_size: int = 1,
                     all_rows: bool = False) -> DataLoader:
    """The held-out loader of a sweep (trials and the registry gate alike): exact shards, longest
    rows first, ``train.eval_batch_size`` (or ``batch_size``) rows a batch. With
    ``train.eval_batches`` only the rows those batches hold, taken in split order, are sorted:
    sorting the whole split first would make a partial eval the longest rows, not a sample.
    ``all_rows=True`` (the registry gate) ignores ``eval_batches``."""
    batch_size = spec.train.eval_batch_size or spec.train.batch_size
    rows = splits.eval
    if spec.train.eval_batches is not None and not all_rows:
        rows = rows.select(range(min(len(rows), spec.train.eval_batches * batch_size * world_size)))
    return make_loader(rows, batch_size, shuffle=False,
                       seed=spec.search.seed, pad_token_id=splits.pad_token_id, rank=rank, world_size=world_size,
                       exact_shards=True, by_length=True)


# ------------------------------------------------------------------------ prepared once per sweep
SPLITS_META = "splits.json"


def save_splits(splits: DatasetSplits, folder: str | Path) -> Path:
    """Write tokenized splits (Arrow) so every trial's workers memory-map them instead of re-tokenizing."""
    import json

    folder = Path(folder)
    splits.train.save_to_disk(str(folder / "train"))
    splits.eval.save_to_disk(str(folder / "eval"))
    meta = {"num_labels": splits.num_labels, "label_names": splits.label_names,
            "pad_token_id": splits.pad_token_id, "stats": splits.stats}
    (folder / SPLITS_META).write_text(json.dumps(meta, indent=2))
    return folder


def load_splits(folder: str | Path) -> DatasetSplits:
    import json

    from datasets import load_from_disk

    folder = Path(folder)
    meta = json.loads((folder / SPLITS_META).read_text())
    train, eval_ = load_from_disk(str(folder / "train")), load_from_disk(str(folder / "eval"))
    train.set_format("torch", columns=MODEL_COLUMNS)
    eval_.set_format("torch", columns=MODEL_COLUMNS)
    return DatasetSplits(train=train, eval=eval_, **meta)


def build_for_spec(spec: Any, tokenizer: Any) -> DatasetSplits:
    """The splits a sweep's ``data`` section describes (the same for trials and the registry gate)."""
    d = spec.data
    return build_datasets(d.source, tokenizer=tokenizer, task=spec.base.task, seq_len=d.seq_len, seed=spec.search.seed,
                          eval_size=d.eval_size, prompt_field=d.prompt_field, response_field=d.response_field,
                          text_field=d.text_field, label_field=d.label_field, system_prompt=d.system_prompt,
                          max_train_examples=d.max_train_examples)
