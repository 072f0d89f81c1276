"""The one evaluation shared by trials and by the registry's champion-vs-candidate gate.

A promotion decision compares numbers from different runs, so both must come from the same
code with the same weighting:

* ``causal_lm``: ``eval_loss`` is the mean cross-entropy over *all label tokens* of the eval
  set (sum of per-token losses / number of tokens), not a mean of per-batch means, which would
  over-weight short batches and depend on the batch size; ``perplexity = exp(eval_loss)``.
  The loss is computed here (shifted by one position), never taken from the model's own
  ``loss``, so every model (HF, PEFT wrapper, test fake) is weighted identically; where the
  model allows it, only the label positions go through the output head (:mod:`sweeps.loss`).
* ``seq_cls``: ``eval_loss`` (mean over examples), ``accuracy`` and macro ``f1`` (the
  unweighted mean of per-class F1 over the classes that occur in the labels or the
  predictions, as scikit-learn's ``average="macro"``), from one accumulated confusion matrix.

Under ``torch.distributed`` the sums, counts and confusion matrix are all-reduced once, after
the loop, so every rank returns the global figure and ranks may run different batch counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .loss import IGNORE_INDEX, label_token_plan

TASKS = ("causal_lm", "seq_cls")


def evaluate(
    model: nn.Module, loader: Iterable[Mapping[str, Any]], *, task: str, max_batches: int | None = None,
    padding_free: bool = True,
) -> dict[str, float]:
    """Evaluate ``model`` on ``loader`` (batches from :func:`sweeps.data.collate`), see module doc.

    Returns ``eval_loss`` and ``perplexity`` (causal_lm) or ``eval_loss``, ``accuracy`` and
    ``f1`` (seq_cls), plus ``eval_tokens`` / ``eval_examples`` (the global counts behind them).
    Runs under ``model.eval()`` and ``torch.no_grad()`` and restores every submodule's
    previous training flag afterwards. ``padding_free`` runs causal-LM batches packed where that
    is faster (:mod:`sweeps.packing`: the same sums).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not supported; allowed: {', '.join(TASKS)}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches={max_batches!r} must be None or an integer >= 1")
    inner = _unwrap(model)
    device = _device_of(inner)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    confusion: torch.Tensor | None = None  # [true, predicted], seq_cls only
    plan = label_token_plan(inner) if task == "causal_lm" else None
    try:
        with torch.no_grad():
            for step, batch in enumerate(loader):
                if max_batches is not None and step >= max_batches:
                    break
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if "labels" not in batch:
                    raise ValueError(f"evaluate needs a 'labels' column in each batch; got {sorted(batch)}")
                labels = batch.pop("labels")
                if plan is not None and set(batch) <= {"input_ids", "attention_mask"}:
                    s, n, _ = plan.sums(batch["input_ids"], batch.get("attention_mask"), labels,
                                     padding_free=padding_free)
                    s, n = s.double(), n.double()
                elif task == "causal_lm":
                    s, n = _causal_sums(_logits(inner(**batch)), labels)
                else:
                    logits = _logits(inner(**batch))
                    s, n, pairs = _cls_sums(logits, labels)
                    confusion = _add_pairs(confusion, pairs, logits.shape[-1], device)
                loss_sum += s
                count += n
    finally:
        for module, training in modes:
            module.training = training

    if task == "causal_lm":
        loss_sum, count = _all_reduce_sum(torch.stack([loss_sum, count])).unbind()
        if count.item() == 0:
            raise ValueError("evaluate saw no label tokens (every label is -100 or the loader is empty)")
        loss = (loss_sum / count).item()
        return {"eval_loss": loss, "perplexity": _safe_exp(loss), "eval_tokens": count.item()}

    confusion = _all_reduce_confusion(confusion, device)
    loss_sum, count = _all_reduce_sum(torch.stack([loss_sum, count])).unbind()
    if count.item() == 0:
        raise ValueError("evaluate saw no labelled examples (every label is -100 or the loader is empty)")
    return {
        "eval_loss": (loss_sum / count).item(),
        "accuracy": (confusion.diagonal().sum() / confusion.sum()).item(),
        "f1": macro_f1(confusion),
        "eval_examples": count.item(),
    }


def macro_f1(confusion: torch.Tensor) -> float:
    """Macro F1 of a ``[true, predicted]`` confusion matrix over classes seen in either axis."""
    confusion = confusion.to(torch.float64)
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    present = (confusion.sum(0) + confusion.sum(1)) > 0
    if not bool(present.any()):
        return 0.0
    denom = 2 * tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp_min(1e-12), torch.zeros_like(tp))
    return f1[present].mean().item()


# --------------------------------------------------------------------------- internals


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel: its forward syncs buffers, a collective that
    would hang when ranks run different numbers of eval batches."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output {type(output).__name__} has no .logits tensor")
    return logits


def _causal_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE over label tokens and their count (logits at t predict labels at t+1)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"causal_lm needs logits [B, T, V] and labels [B, T]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if logits.shape[1] < labels.shape[1]:
        raise ValueError(f"logits cover {logits.shape[1]} positions but labels {labels.shape[1]}")
    # Prompt-learning methods prepend virtual tokens: their positions come first, drop them.
    logits = logits[:, logits.shape[1] - labels.shape[1]:]
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shift_labels = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss.double(), (shift_labels != IGNORE_INDEX).sum().double()


def _cls_sums(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed CE, example count and the (true, predicted) pairs of the labelled rows."""
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"seq_cls needs logits [B, C] and labels [B]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    keep = labels != IGNORE_INDEX
    labels, logits = labels[keep], logits[keep].float()
    if labels.numel() and (labels.min() < 0 or labels.max() >= logits.shape[-1]):
        raise ValueError(f"label ids must lie in [0, {logits.shape[-1]}) for a {logits.shape[-1]}-way head; "
                         f"got {labels.min().item()}..{labels.max().item()}")
    loss = F.cross_entropy(logits, labels, reduction="sum")
    pairs = torch.stack([labels, logits.argmax(-1)], dim=1)
    return loss.double(), torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device), pairs


def _add_pairs(confusion: torch.Tensor | None, pairs: torch.Tensor, classes: int, device: torch.device) -> torch.Tensor:
    if confusion is None:
        confusion = torch.zeros((classes, classes), dtype=torch.float64, device=device)
    flat = pairs[:, 0] * classes + pairs[:, 1]
    confusion += torch.bincount(flat, minlength=classes * classes).view(classes, classes).to(confusion)
    return confusion


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def _all_reduce_confusion(confusion: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Sum confusion matrices across ranks; a rank that saw no batch still takes part."""
    classes = 0 if confusion is None else confusion.shape[0]
    if _distributed():
        size = torch.tensor([classes], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(size, op=torch.distributed.ReduceOp.MAX)
        classes = int(size.item())
    padded = torch.zeros((classes, classes), dtype=torch.float64, device=device)
    if confusion is not None:  # never raise between collectives: other ranks would hang
        padded[: confusion.shape[0], : confusion.shape[1]] = confusion
    return _all_reduce_sum(confusion)


def _safe_exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf
