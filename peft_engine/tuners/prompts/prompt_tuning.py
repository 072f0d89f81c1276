"""Prompt tuning's encoder: one trainable embedding row per virtual token.

The rows start random, at random vocabulary rows, or at the embeddings of a text; the text
is tokenised with a tokenizer from a local folder or a tokenizer object, never from the Hub.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import nn

from .config import PromptTuningConfig


class PromptEmbedding(nn.Module):
    """``embedding``: (num_virtual_tokens * num_transformer_submodules, token_dim), HF PEFT's name."""

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__()
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, config.token_dim)
        init = config.prompt_tuning_init
        if config.inference_mode or init == "RANDOM":
            return  # weights come from a file, or stay at nn.Embedding's N(0, 1)
        if init == "SAMPLE_VOCAB":
            vocab = word_embeddings.num_embeddings
            ids = torch.randint(0, vocab, (total,), dtype=torch.long)
        elif init == "TEXT":
            ids = text_token_ids(config, total)
        else:
            return  # multitask source-task inits are handled by MultitaskPromptEmbedding
        with torch.no_grad():
            rows = word_embeddings(ids.to(word_embeddings.weight.device)).detach().clone()
        self.embedding.weight = nn.Parameter(rows.to(torch.float32))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self.embedding(indices)


def text_token_ids(config: PromptTuningConfig, total: int) -> torch.Tensor:
    """The ids of ``prompt_tuning_init_text``, cut or cycled to exactly ``total`` tokens."""
    tokenizer = load_local_tokenizer(config.tokenizer_name_or_path, config.tokenizer_kwargs)
    ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
    if not ids:
        raise ValueError(f"prompt_tuning_init_text={config.prompt_tuning_init_text!r} tokenises to no tokens; "
                         "allowed: a text with at least one token")
    ids = (ids * math.ceil(total / len(ids)))[:total]
    return torch.tensor(ids, dtype=torch.long)


def load_local_tokenizer(source: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """A tokenizer object as is, or one read from a local folder with downloads switched off."""
    if source is None:
        raise ValueError("tokenizer_name_or_path=None is not allowed with prompt_tuning_init='TEXT'; "
                         "allowed: a local tokenizer folder or a tokenizer object")
    if not isinstance(source, (str, os.PathLike)):
        if not callable(source):
            raise ValueError(f"tokenizer_name_or_path={source!r} is not allowed; allowed: a local tokenizer "
                             "folder or a callable tokenizer object")
        return source
    path = os.fspath(source)
    if not os.path.isdir(path):
        raise ValueError(f"tokenizer_name_or_path={path!r} is not a local folder; allowed: a local tokenizer "
                         "folder or a tokenizer object (peft_engine never downloads from the Hub)")
    from transformers import AutoTokenizer

    options = dict(kwargs or {})
    options.pop("trust_remote_code", None)  # remote code is never run for an init text
    options["local_files_only"] = True
    return AutoTokenizer.from_pretrained(path, **options)
