"""P-tuning's encoder: virtual token embeddings passed through an MLP or a BiLSTM + MLP.

The reparameterisation only exists while training; files hold its output (the prompts), so
an adapter built for inference or loaded from a file is a plain embedding table.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .config import PromptEncoderConfig


class PromptEncoder(nn.Module):
    """``embedding`` plus ``mlp_head`` (and ``lstm_head`` for LSTM), HF PEFT's attribute names."""

    def __init__(self, config: PromptEncoderConfig) -> None:
        super().__init__()
        dim, hidden = config.token_dim, config.encoder_hidden_size
        self.encoder_type = config.encoder_reparameterization_type
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.embedding = nn.Embedding(total, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(input_size=dim, hidden_size=hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            if config.encoder_num_layers != 2:
                warnings.warn(f"encoder_num_layers={config.encoder_num_layers} is ignored for the MLP encoder, "
                              "which always has 2 hidden layers (as in HF PEFT)", stacklevel=3)
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    @property
    def reparameterized(self) -> bool:
        return self.mlp_head is not None

    def to_direct(self, rows: torch.Tensor) -> None:
        """Hold ``rows`` (this encoder's output, e.g. from a file) directly; the reparameterisation goes."""
        self.embedding = nn.Embedding.from_pretrained(rows.detach().clone(), freeze=False)
        self.lstm_head = None
        self.mlp_head = None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = self.embedding(indices)
        if self.lstm_head is not None:
            rows = self.lstm_head(rows)[0]
        return self.mlp_head(rows) if self.mlp_head is not None else rows
