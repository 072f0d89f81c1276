"""How prompt learning extends a forward pass and ``generate()``, per task type.

Virtual tokens go in front of the real ones: their embeddings are concatenated to the input
embeddings (prompt tuning, P-tuning, multitask), or their keys and values fill the KV cache
before the first real token (prefix tuning). Either way the attention mask gains
``num_virtual_tokens`` leading ones, causal-LM labels gain as many ``-100`` (virtual tokens
predict nothing), and positions are counted after the virtual tokens. The per-task rules
(encoder-only prompts for seq2seq prompt tuning, decoder prompts for multitask seq2seq ...)
follow HF PEFT so that outputs match it exactly.

``generate()`` injects the prompt (or prefix) on the step whose cache is still empty and
extends the attention mask on every step, by wrapping the model's
``prepare_inputs_for_generation`` for the duration of the call, so greedy search, sampling,
beam search and the KV cache all work unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ...config import PeftType

if TYPE_CHECKING:
    from .config import PromptLearningConfig
    from .tuner import PromptLearningModel

PREFIX = PeftType.PREFIX_TUNING.value
ENCODER_ONLY_PROMPTS = (PeftType.PROMPT_TUNING.value, PeftType.P_TUNING.value)


# ---- forward ----------------------------------------------------------------------------------
def forward(tuner: PromptLearningModel, input_ids: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
            labels: torch.Tensor | None = None, task_ids: Any = None, **kwargs: Any) -> Any:
    if not tuner.adapters_enabled:
        given = _given(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels)
        return tuner.model(**given, **kwargs)
    config = tuner.active_config
    task = config.task_type
    if task == "CAUSAL_LM":
        return _causal(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs)
    if task == "SEQ_2_SEQ_LM":
        return _seq2seq(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs)
    return _encoder(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs)


def _causal(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs):
    batch, n = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
    continuing = cache_length(kwargs.get("past_key_values")) > 0  # a later step of a manual decoding loop
    attention_mask = extend_mask(attention_mask, batch, n)
    adjust_kwargs(config, kwargs, keep_token_types=False)
    if config.peft_type == PREFIX:
        if not continuing:
            kwargs["past_key_values"] = tuner.prefix(batch)
        given = _given(input_ids=input_ids, inputs_embeds=inputs_embeds, labels=labels)
        return tuner.model(attention_mask=attention_mask, **given, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = tuner.word_embeddings(input_ids)
    if not continuing:
        if labels is not None:
            labels = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
        prompts = tuner.prompts(batch, task_ids).to(inputs_embeds.dtype)
        inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    return tuner.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **_given(labels=labels), **kwargs)


def _seq2seq(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs):
    batch, n = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
    decoder_mask = kwargs.pop("decoder_attention_mask", None)
    if config.peft_type not in ENCODER_ONLY_PROMPTS:
        decoder_mask = extend_mask(decoder_mask, batch, n)  # the decoder sees the prefix / decoder prompts
    adjust_kwargs(config, kwargs, keep_token_types=False)
    decoder_ids = kwargs.pop("decoder_input_ids", None)
    decoder_embeds = kwargs.pop("decoder_inputs_embeds", None)
    common = _given(decoder_attention_mask=decoder_mask, labels=labels)
    if config.peft_type == PREFIX:
        if cache_length(kwargs.get("past_key_values")) == 0:
            kwargs["past_key_values"] = tuner.prefix(batch)
        given = _given(input_ids=input_ids, inputs_embeds=inputs_embeds, decoder_input_ids=decoder_ids,
                       decoder_inputs_embeds=decoder_embeds, attention_mask=attention_mask)
        return tuner.model(**given, **common, **kwargs)
    if inputs_embeds is None:
        inputs_embeds = tuner.word_embeddings(input_ids)
    attention_mask = extend_mask(attention_mask, batch, n)
    prompts = tuner.prompts(batch, task_ids).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((prompts[:, :n], inputs_embeds), dim=1)
    if config.peft_type in ENCODER_ONLY_PROMPTS or config.num_transformer_submodules == 1:
        given = _given(attention_mask=attention_mask, decoder_input_ids=decoder_ids,
                       decoder_inputs_embeds=decoder_embeds)
        return tuner.model(inputs_embeds=inputs_embeds, **given, **common, **kwargs)
    # Multitask prompt tuning with two submodules: the second half of the prompt leads the decoder.
    if decoder_embeds is None:
        if decoder_ids is None:
            decoder_ids = _shift_right(tuner.model, labels)
        decoder_embeds = tuner.word_embeddings(decoder_ids)
    decoder_embeds = torch.cat((prompts[:, n:].to(decoder_embeds.dtype), decoder_embeds), dim=1)
    if labels is not None:
        common["labels"] = torch.cat((labels.new_full((batch, n), -100), labels), dim=1)
    return tuner.model(inputs_embeds=inputs_embeds, decoder_inputs_embeds=decoder_embeds,
                       **_given(attention_mask=attention_mask), **common, **kwargs)


def _encoder(tuner, config, input_ids, attention_mask, inputs_embeds, labels, task_ids, kwargs):
    """Sequence classification and feature extraction."""
    batch, n = _batch_size(input_ids, inputs_embeds), config.num_virtual_tokens
    classify = config.task_type == "SEQ_CLS"
    attention_mask = extend_mask(attention_mask, batch, n)
    adjust_kwargs(config, kwargs, keep_token_types=classify)
    if config.peft_type == PREFIX:
        kwargs["past_key_values"] = tuner.prefix(batch)
        given = _given(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        if classify and "past_key_values" not in inspect.signature(tuner.model.forward).parameters:
            return _classify_from_backbone(tuner.model, labels, given, kwargs)
        return tuner.model(**given, **_given(labels=labels), **kwargs)
    if kwargs.get("token_type_ids") is not None:
        types = kwargs["token_type_ids"]
        kwargs["token_type_ids"] = torch.cat((types.new_zeros(batch, n), types), dim=1)
    if inputs_embeds is None:
        inputs_embeds = tuner.word_embeddings(input_ids)
    prompts = tuner.prompts(batch, task_ids).to(inputs_embeds.dtype)
    inputs_embeds = torch.cat((prompts, inputs_embeds), dim=1)
    return tuner.model(inputs_embeds=inputs_embeds, **_given(attention_mask=attention_mask, labels=labels), **kwargs)


def _classify_from_backbone(model: nn.Module, labels, given: dict, kwargs: dict) -> Any:
    """Classifiers whose forward takes no cache: run their encoder with the prefix, then their head."""
    from transformers import PreTrainedModel
    from transformers.modeling_outputs import SequenceClassifierOutput

    backbone = next((m for _, m in model.named_children() if isinstance(m, PreTrainedModel)), None)
    if backbone is None or "past_key_values" not in inspect.signature(backbone.forward).parameters:
        raise ValueError(f"{type(model).__name__} does not accept past_key_values, which prefix tuning needs")
    return_dict = kwargs.get("return_dict")
    outputs = backbone(**given, **kwargs)
    if isinstance(outputs, tuple):
        pooled = outputs[1] if len(outputs) > 1 else outputs[0]
    else:
        pooled = outputs.pooler_output if getattr(outputs, "pooler_output", None) is not None else outputs[0]
    children = dict(model.named_children())
    if "dropout" in children:
        pooled = children["dropout"](pooled)
    head = children.get("classifier", children.get("score"))
    if head is None:
        raise ValueError(f"{type(model).__name__} has no 'classifier' or 'score' head")
    logits = head(pooled)
    loss = None if labels is None else _classification_loss(model, logits, labels)
    if return_dict is False:
        rest = tuple(outputs[2:]) if isinstance(outputs, tuple) else ()
        return ((loss,) if loss is not None else ()) + (logits,) + rest
    return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=getattr(outputs, "hidden_states", None),
                                    attentions=getattr(outputs, "attentions", None))


def _classification_loss(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' sequence-classification loss, problem type inferred the same way."""
    config, num_labels = model.config, model.config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        if num_labels == 1:
            return nn.functional.mse_loss(logits.squeeze(), labels.squeeze())
        return nn.functional.mse_loss(logits, labels)
    if config.problem_type == "single_label_classification":
        return nn.functional.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


# ---- generate ---------------------------------------------------------------------------------
def generate(tuner: PromptLearningModel, *args: Any, **kwargs: Any) -> Any:
    if not tuner.adapters_enabled:
        kwargs.pop("task_ids", None)
        return tuner.model.generate(*args, **kwargs)
    config = tuner.active_config
    if config.task_type == "CAUSAL_LM":
        with _wrapped_prepare(tuner.model, lambda original: _causal_prepare(tuner, original)):
            return tuner.model.generate(*args, **kwargs)
    if config.task_type == "SEQ_2_SEQ_LM":
        if config.peft_type == PREFIX:
            kwargs.pop("task_ids", None)
            adjust_kwargs(config, kwargs, keep_token_types=False)
            with _wrapped_prepare(tuner.model, lambda original: _seq2seq_prefix_prepare(tuner, original)):
                return tuner.model.generate(*args, **kwargs)
        return _seq2seq_prompt_generate(tuner, config, *args, **kwargs)
    raise NotImplementedError(f"generate() is not available for task_type={config.task_type!r}; "
                              "allowed: 'CAUSAL_LM', 'SEQ_2_SEQ_LM'")


@contextlib.contextmanager
def _wrapped_prepare(model: nn.Module, make: Callable[[Callable], Callable]) -> Iterator[None]:
    had_own = "prepare_inputs_for_generation" in vars(model)
    original = model.prepare_inputs_for_generation
    model.prepare_inputs_for_generation = make(original)
    try:
        yield
    finally:
        if had_own:
            model.prepare_inputs_for_generation = original
        else:
            del model.prepare_inputs_for_generation


def _causal_prepare(tuner: PromptLearningModel, original: Callable) -> Callable:
    def prepare_inputs_for_generation(input_ids, *args, task_ids=None, **kwargs):
        inputs = original(input_ids, *args, **kwargs)
        config = tuner.active_config
        ids = inputs.get("input_ids")
        batch = ids.shape[0] if ids is not None else inputs["inputs_embeds"].shape[0]
        mask = inputs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise NotImplementedError("prompt-learning generate() extends 2-D attention masks only; allowed: "
                                          "the default dynamic cache (not cache_implementation='static')")
            inputs["attention_mask"] = extend_mask(mask, batch, config.num_virtual_tokens)
        adjust_kwargs(config, inputs, keep_token_types=False, quiet=True)
        if cache_length(inputs.get("past_key_values")) == 0:
            if config.peft_type == PREFIX:
                inputs["past_key_values"] = tuner.prefix(batch)
            else:
                if ids is None:
                    raise ValueError("generate() with prompt learning needs input_ids (not inputs_embeds)")
                embeds = tuner.word_embeddings(ids)
                prompts = tuner.prompts(batch, task_ids).to(embeds.dtype)
                inputs["inputs_embeds"] = torch.cat((prompts, embeds), dim=1)
                inputs["input_ids"] = None
        return inputs

    return prepare_inputs_for_generation


def _seq2seq_prefix_prepare(tuner: PromptLearningModel, original: Callable) -> Callable:
    def prepare_inputs_for_generation(*args, **kwargs):
        inputs = original(*args, **kwargs)
        if cache_length(inputs.get("past_key_values")) == 0:
            inputs["past_key_values"] = tuner.prefix(inputs["decoder_input_ids"].shape[0])
        return inputs

    return prepare_inputs_for_generation


def _seq2seq_prompt_generate(tuner: PromptLearningModel, config: PromptLearningConfig, *args: Any, **kwargs: Any):
    input_ids = kwargs.pop("input_ids", None)
    if args:
        if input_ids is not None or len(args) > 1:
            raise ValueError("pass the prompt once, as input_ids=...")
        input_ids = args[0]
    if input_ids is None:
        raise ValueError("generate() with prompt learning needs input_ids (not inputs_embeds)")
    if kwargs.pop("encoder_outputs", None) is not None:
        warnings.warn("encoder_outputs is ignored by prompt-learning generate(): the encoder must see the prompt",
                      stacklevel=3)
    adjust_kwargs(config, kwargs, keep_token_types=False)
    task_ids = kwargs.pop("task_ids", None)
    embeds = tuner.word_embeddings(input_ids)
    batch, n = embeds.shape[0], config.num_virtual_tokens
    prompts = tuner.prompts(batch, task_ids).to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat((prompts[:, :n], embeds), dim=1)
    if kwargs.get("attention_mask") is not None:
        kwargs["attention_mask"] = extend_mask(kwargs["attention_mask"], batch, n)
    return tuner.model.generate(**kwargs)


# ---- small shared pieces ------------------------------------------------------------------------
def extend_mask(mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """``n`` leading ones: every real token may attend to every virtual token."""
    if mask is None:
        return None
    if mask.dim() != 2:
        raise ValueError(f"attention_mask with shape {tuple(mask.shape)} is not allowed with prompt learning; "
                         "allowed: a 2-D (batch, sequence) mask")
    return torch.cat((mask.new_ones(batch, n), mask), dim=1)


def adjust_kwargs(config: PromptLearningConfig, kwargs: dict, *, keep_token_types: bool, quiet: bool = False) -> None:
    """Positions count past the virtual tokens; token types only make sense for classifiers."""
    positions = kwargs.get("position_ids")
    if positions is not None:
        if config.peft_type == PREFIX:
            kwargs["position_ids"] = positions + config.num_virtual_tokens
        else:
            if not quiet:
                warnings.warn(f"position_ids are ignored with {config.peft_type}: the model numbers the "
                              "virtual and real tokens itself", stacklevel=4)
            kwargs.pop("position_ids")
    if not keep_token_types and kwargs.get("token_type_ids") is not None:
        if not quiet:
            warnings.warn(f"token_type_ids are ignored with {config.peft_type} for {config.task_type}", stacklevel=4)
        kwargs.pop("token_type_ids")


def cache_length(cache: Any) -> int:
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and cache[0] is not None:
        return int(cache[0][0].shape[-2])
    return 0


def _batch_size(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> int:
    if input_ids is not None:
        return input_ids.shape[0]
    if inputs_embeds is not None:
        return inputs_embeds.shape[0]
    raise ValueError("input_ids=None and inputs_embeds=None: prompt learning needs one of them")


def _given(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


def _shift_right(model: nn.Module, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        raise ValueError("decoder_input_ids=None, decoder_inputs_embeds=None and labels=None: multitask prompt "
                         "tuning of a seq2seq model needs one of them to build the decoder input")
    config = model.config
    start, pad = config.decoder_start_token_id, config.pad_token_id
    if start is None or pad is None:
        raise ValueError("the model config needs decoder_start_token_id and pad_token_id to shift labels right")
    shifted = labels.new_zeros(labels.shape)
    shifted[:, 1:] = labels[:, :-1].clone()
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == -100, pad)
