"""Prefix tuning: per-layer key/value prefixes, handed to the model as a transformers cache.

The encoder yields one row of ``num_layers * 2 * token_dim`` values per virtual token (keys and
values of every layer). :func:`prefix_cache` lays them out as transformers 5 expects
``past_key_values``: a ``DynamicCache`` already holding ``num_virtual_tokens`` positions for
decoder-only models, and for encoder-decoder models an ``EncoderDecoderCache`` whose decoder
self-attention holds the prefix while its cross-attention cache starts empty (the encoder
output is not known yet). The layer order reproduces HF PEFT's, so files move both ways.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import PrefixTuningConfig


class PrefixEncoder(nn.Module):
    """``embedding`` (+ ``transform`` MLP with ``prefix_projection``), HF PEFT's attribute names.

    Built for inference (or from a file) the encoder holds the prefixes themselves: a
    projection cannot be inverted, so files carry its output and loading keeps that.
    """

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width = config.num_layers * 2 * config.token_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(
                nn.Linear(config.token_dim, config.encoder_hidden_size),
                nn.Tanh(),
                nn.Linear(config.encoder_hidden_size, width),
            )
            if config.init_weights == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    @property
    def reparameterized(self) -> bool:
        return self.transform is not None

    def to_direct(self, rows: torch.Tensor) -> None:
        """Hold ``rows`` (this encoder's output, e.g. from a file) directly; the reparameterisation goes."""
        self.embedding = nn.Embedding.from_pretrained(rows.detach().clone(), freeze=False)
        self.transform = None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.embedding(indices)
        return self.transform(rows) if self.transform is not None else rows


def prefix_cache(rows: torch.Tensor, config: PrefixTuningConfig, batch_size: int):
    """``rows`` (num_virtual_tokens, num_layers * 2 * token_dim) -> a cache for ``batch_size`` examples."""
    from transformers import DynamicCache, EncoderDecoderCache

    heads = config.num_attention_heads
    tokens = config.num_virtual_tokens
    kv = rows.unsqueeze(0).expand(batch_size, -1, -1)
    kv = kv.reshape(batch_size, tokens, config.num_layers * 2, heads, config.token_dim // heads)
    if config.num_transformer_submodules == 2:
        # HF PEFT's layout for encoder-decoder models: the stack is doubled along the layer axis
        # and cut into groups of four (self-attention k, v, then cross-attention k, v) per layer.
        kv = torch.cat([kv, kv], dim=2)
    # (layer-stack, batch, heads, tokens, head_dim), then one group per layer.
    groups = kv.permute(2, 0, 3, 1, 4).split(config.num_transformer_submodules * 2)
    if config.num_transformer_submodules == 1:
        return DynamicCache([(g[0], g[1]) for g in groups])
    self_attention = DynamicCache([(g[0], g[1]) for g in groups])
    # Cross-attention entries are filled from the encoder output on the first decoder step.
    return EncoderDecoderCache(self_attention, DynamicCache())
