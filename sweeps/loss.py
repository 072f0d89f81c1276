"""Causal-LM loss on the label tokens only: the output head runs where a label is predicted.

Chat SFT puts the loss on the response tokens (under 30% of the packaged Q/A data's tokens),
yet a model's own forward projects every position onto the vocabulary and takes a softmax over
it. On SmolLM2 that head (576 x 49,152 per token, in the forward and again for the input
gradient) is about a tenth of a frozen-base step. :class:`TrainingLoss` runs the decoder body,
gathers the hidden states whose next token is a label, and applies the head and the
cross-entropy to those rows alone: the same loss (the mean over label tokens, as the model's
own ``.loss``) for about 15% less time per step on SmolLM2.

The split is checked, not assumed: :func:`label_token_plan` compares the two paths once on a
fixed probe input, and any model whose head does more than a projection (logit soft-capping or
scaling, prompt-learning methods that prepend virtual tokens, a wrapper without a decoder) keeps
its own forward. The same probe decides whether the body may take padding-free batches
(:mod:`sweeps.packing`).
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .packing import IGNORE_INDEX, PackingCost, pack_rows, packing_cost, should_pack

_PROBE_TOKENS = 8
_PROBE_RTOL = 1e-4
_PROBE_ATOL = 1e-6

log = logging.getLogger(__name__)


class LabelSums(NamedTuple):
    total: torch.Tensor
    count: torch.Tensor
    packed: bool


@dataclass(frozen=True)
class LabelTokenPlan:
    """Where to split a causal LM: its decoder body (to hidden states) and its output head.
    ``packing`` is the cost model of padding-free batches (:mod:`sweeps.packing`), None where the
    body's packed-sequence attention did not match its padded one on the probe."""

    body: nn.Module
    head: nn.Module
    packing: PackingCost | None = None

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # No KV cache in training or eval; with one, transformers ignores packed position ids.
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def sums(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
             *, padding_free: bool = False) -> LabelSums:
        """Summed next-token cross-entropy over the label tokens (float32), their count, and whether
        the rows ran packed (with ``padding_free``, where the cost model says that is faster)."""
        position_ids = None
        if padding_free and should_pack(self.packing, attention_mask):
            packed = pack_rows(input_ids, attention_mask, labels)
            if packed is not None:
                input_ids, position_ids, labels = packed
                attention_mask = None
        hidden = self.hidden(input_ids, attention_mask, position_ids)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.head(hidden[:, :-1][keep]).float()
        loss = F.cross_entropy(logits, targets[keep], reduction="sum")
        return LabelSums(loss, keep.sum(), position_ids is not None)


_PLANS: weakref.WeakKeyDictionary[nn.Module, LabelTokenPlan | None] = weakref.WeakKeyDictionary()


def label_token_plan(model: nn.Module) -> LabelTokenPlan | None:
    """The body/head split of ``model`` (a PeftModel or a transformers causal LM) when the
    label-token loss equals the model's own on a probe input; None otherwise. Probed once per
    model: a trial's loss and each of its evals ask again and get the same answer."""
    if model not in _PLANS:
        _PLANS[model] = _probe_plan(model)
    return _PLANS[model]


def _probe_plan(model: nn.Module) -> LabelTokenPlan | None:
    if getattr(_first_config(model), "is_prompt_learning", False):
        return None  # virtual tokens are prepended by the wrapper's forward, not the body
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    body, head = get_decoder(), get_head()
    if body is None or body is base or not isinstance(head, nn.Module):
        return None
    plan = LabelTokenPlan(body, head)
    with _inference(model):
        if not _agrees(model, plan, base):
            return None
        if _packs_like_padded(plan):
            return LabelTokenPlan(body, head, packing_cost(base, body))
    return plan


class TrainingLoss(nn.Module):
    """``model``'s training loss as a module (so DistributedDataParallel can wrap it): with
    ``label_tokens`` (causal LMs) the mean cross-entropy over label tokens through
    :class:`LabelTokenPlan` where the model allows it, else ``model(**batch).loss``. AdaLoRA's
    orthogonality term is added as its own forward does. ``padding_free`` packs each batch's
    rows into one sequence where that is faster (:mod:`sweeps.packing`; same loss and gradients)."""

    def __init__(self, model: nn.Module, *, label_tokens: bool = True, padding_free: bool = True) -> None:
        super().__init__()
        self.model = model
        self.plan = label_token_plan(model) if label_tokens else None
        self.padding_free = padding_free
        self.packed_batches = 0  # how many forward calls ran padding-free (a trial logs the share)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if self.plan is None or kwargs:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs).loss
        total, count, packed = self.plan.sums(input_ids, attention_mask, labels, padding_free=self.padding_free)
        self.packed_batches += packed
        loss = total / count.clamp_min(1)
        regularizer = getattr(getattr(self.model, "base_model", None), "orthogonal_regularization", None)
        if regularizer is not None and self.model.training:
            loss = loss + regularizer()
        return loss


def _first_config(model: nn.Module) -> Any:
    configs = getattr(model, "peft_config", None)
    return next(iter(configs.values()), None) if isinstance(configs, dict) else None


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """No dropout and no gradients for the probes; every submodule's training flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _probe_ids(module: nn.Module, length: int, offset: int = 0) -> torch.Tensor:
    """Fixed token ids within ``module``'s vocabulary, on its device."""
    vocab = getattr(getattr(module, "config", None), "vocab_size", None) or 2
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return ((torch.arange(length, device=device) + offset) * 7919 % vocab).unsqueeze(0)


def _agrees(model: nn.Module, plan: LabelTokenPlan, base: nn.Module) -> bool:
    """Both paths give the same logits on a fixed probe: a head that caps or scales its logits
    after the projection shows here even where a loss would not."""
    ids = _probe_ids(base, _PROBE_TOKENS)
    mask = torch.ones_like(ids)
    try:
        own = getattr(model(input_ids=ids, attention_mask=mask), "logits", None)
        ours = plan.head(plan.hidden(ids, mask))
    except Exception as exc:  # a body that wants other inputs: keep the model's own forward
        log.info("label-token loss unavailable for %s: %s", type(base).__name__, exc)
        return False
    same = isinstance(own, torch.Tensor) and own.shape == ours.shape and bool(
        torch.allclose(ours.float(), own.float(), rtol=_PROBE_RTOL, atol=_PROBE_ATOL))
    if not same:
        log.info("label-token logits differ from %s's own: using the full forward", type(base).__name__)
    return same


def _packs_like_padded(plan: LabelTokenPlan) -> bool:
    """Two rows of different lengths give the same hidden states packed as padded: the body
    honours packed position ids (transformers' packed-sequence mask and rotary positions)."""
    body = plan.body
    short = _PROBE_TOKENS - 3
    ids = torch.cat([_probe_ids(body, _PROBE_TOKENS), _probe_ids(body, _PROBE_TOKENS, offset=11)])
    mask = torch.ones_like(ids)
    mask[1, short:] = 0
    packed = pack_rows(ids, mask, torch.zeros_like(ids))
    try:
        padded = plan.hidden(ids, mask)[mask.bool()]
        flat = plan.hidden(packed.input_ids, None, packed.position_ids)[0]
    except Exception as exc:
        log.info("padding-free batches unavailable for %s: %s", type(body).__name__, exc)
        return False
    # The two layouts take different attention kernels: float noise that grows with the hidden
    # states' scale (6e-5 on SmolLM2's, which reach 42), where misplaced rows differ by O(scale).
    scale = float(padded.abs().max()) if padded.numel() else 0.0
    same = padded.shape == flat.shape and bool(torch.allclose(flat.float(), padded.float(), rtol=_PROBE_RTOL,
                                                              atol=max(_PROBE_ATOL, _PROBE_RTOL * 0.1 * scale)))
    if not same:
        log.info("packed rows differ from padded ones in %s: batches stay padded", type(body).__name__)
    return same
