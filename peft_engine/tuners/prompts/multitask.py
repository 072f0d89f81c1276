"""Multitask prompt tuning: a shared prompt, scaled element-wise per task by a low-rank matrix.

Task ``t``'s prompt is ``embedding * (prefix_task_cols[t] @ prefix_task_rows[t])``. Target tasks
can start from a source adapter's file (its average task, one of its tasks, or only its shared
prompt); such files are read as safetensors only, never unpickled.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .config import MultitaskPromptTuningConfig
from .prompt_tuning import PromptEmbedding

SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")


class MultitaskPromptEmbedding(PromptEmbedding):
    """HF PEFT's names: ``embedding``, ``prefix_task_cols`` (tasks, tokens, ranks), ``prefix_task_rows``."""

    def __init__(self, config: MultitaskPromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config, word_embeddings)
        total = config.num_virtual_tokens * config.num_transformer_submodules
        self.num_tasks = config.num_tasks
        self.prefix_task_cols = nn.Parameter(torch.normal(0.0, 0.02, size=(config.num_tasks, total, config.num_ranks)))
        self.prefix_task_rows = nn.Parameter(
            torch.normal(0.0, 0.02, size=(config.num_tasks, config.num_ranks, config.token_dim)))
        if config.prompt_tuning_init in SOURCE_INITS:
            self._init_from_source(config)

    def _init_from_source(self, config: MultitaskPromptTuningConfig) -> None:
        from safetensors.torch import load_file

        path = config.prompt_tuning_init_state_dict_path
        if not str(path).endswith(".safetensors") or not os.path.isfile(path):
            raise ValueError(f"prompt_tuning_init_state_dict_path={path!r} is not allowed; allowed: an existing "
                             ".safetensors adapter file (pickled checkpoints are never loaded)")
        source = load_file(path)
        missing = [k for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows") if k not in source]
        if missing and (config.prompt_tuning_init != "ONLY_SOURCE_SHARED" or "prompt_embeddings" in missing):
            raise ValueError(f"{path}: missing {', '.join(missing)}; is it a multitask prompt tuning adapter?")
        tensors = {"embedding.weight": source["prompt_embeddings"]}
        if config.prompt_tuning_init != "ONLY_SOURCE_SHARED":
            cols, rows = source["prefix_task_cols"], source["prefix_task_rows"]
            if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
                cols, rows = cols.mean(0, keepdim=True), rows.mean(0, keepdim=True)
            else:
                task = config.prompt_tuning_init_task
                if not 0 <= task < cols.shape[0]:
                    raise ValueError(f"prompt_tuning_init_task={task} is not allowed; allowed: 0..{cols.shape[0] - 1} "
                                     f"(the source file has {cols.shape[0]} tasks)")
                cols, rows = cols[task : task + 1], rows[task : task + 1]
            tensors.update(prefix_task_cols=cols, prefix_task_rows=rows)
        own = self.state_dict()
        for key, value in tensors.items():
            if tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)} but this adapter expects "
                                 f"{tuple(own[key].shape)} (check num_tasks, num_ranks, num_virtual_tokens)")
        self.load_state_dict(tensors, strict=False)

    def forward(self, indices: torch.Tensor, task_ids: torch.Tensor | None = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("task_ids=None is not allowed for multitask prompt tuning; allowed: a tensor of "
                             f"task indices in [0, {self.num_tasks}) with one entry per example")
        prompts = self.embedding(indices)
        scale = torch.matmul(self.prefix_task_cols.index_select(0, task_ids),
                             self.prefix_task_rows.index_select(0, task_ids))
        return prompts * scale
