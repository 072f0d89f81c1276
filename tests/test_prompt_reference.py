"""Pinned outputs of the prompt-learning methods, independent of HF PEFT.

A stand-in for cases in the shared regression suite (tests/regression/ had no case registry
yet when these methods landed): seeded tiny models, adapters filled with seeded values, and a
few logits and the loss written down below. The values were produced by peft_engine when it
matched HF PEFT 0.21.2 to 1e-5 (tests/test_prompt_methods.py), so a change here is a change
of behaviour, not of the reference library. Rewrite them with
``PROMPT_REFERENCE_PRINT=1 pytest tests/test_prompt_reference.py -s`` only for an intended change.
"""

from __future__ import annotations

import os

import pytest
import torch

import peft_engine as pe
from tests.conftest import input_ids, tiny_bart, tiny_bert, tiny_gpt2, tiny_llama, tiny_t5

BUILDERS = {"llama": (tiny_llama, "CAUSAL_LM"), "gpt2": (tiny_gpt2, "CAUSAL_LM"), "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
            "bart": (tiny_bart, "SEQ_2_SEQ_LM"), "bert": (tiny_bert, "SEQ_CLS")}
CASES = {
    "prompt_tuning-llama": ("PromptTuningConfig", {"num_virtual_tokens": 3}),
    "prefix-llama": ("PrefixTuningConfig", {"num_virtual_tokens": 3}),
    "prefix_projection-gpt2": ("PrefixTuningConfig", {"num_virtual_tokens": 3, "prefix_projection": True,
                                                      "encoder_hidden_size": 12}),
    "p_tuning_lstm-t5": ("PromptEncoderConfig", {"num_virtual_tokens": 3, "encoder_hidden_size": 12,
                                                 "encoder_reparameterization_type": "LSTM"}),
    "multitask-bart": ("MultitaskPromptTuningConfig", {"num_virtual_tokens": 3, "num_tasks": 2, "num_ranks": 2}),
    "p_tuning_mlp-bert": ("PromptEncoderConfig", {"num_virtual_tokens": 3, "encoder_hidden_size": 12}),
    "adaption_prompt-llama": ("AdaptionPromptConfig", {"adapter_len": 3, "adapter_layers": 1}),
}
# case -> (first 4 logits of the last position of example 0, loss)
REFERENCE = {
    "adaption_prompt-llama": ([0.163607, 0.110951, 0.098009, 0.038359], 4.13978),
    "multitask-bart": ([-0.042619, 0.0, 0.035992, 0.222342], 4.157462),
    "p_tuning_lstm-t5": ([0.608729, -0.512625, -0.9947, -0.243957], 5.086179),
    "p_tuning_mlp-bert": ([0.26834, 0.841026, -0.311291], 1.493483),
    "prefix-llama": ([0.112259, 0.172704, 0.070314, 0.095459], 4.211451),
    "prefix_projection-gpt2": ([0.015242, 0.106492, -0.002757, 0.078818], 4.159678),
    "prompt_tuning-llama": ([0.158106, 0.112131, 0.099248, 0.041196], 4.163588),
}


def _outputs(case: str) -> tuple[list[float], float]:
    cls_name, fields = CASES[case]
    build, task = BUILDERS[case.split("-")[1]]
    model = pe.get_peft_model(build(), getattr(pe, cls_name)(task_type=task, **fields)).eval()
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for _, param in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    ids = input_ids(seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if task == "CAUSAL_LM":
        inputs["labels"] = ids.masked_fill(mask == 0, -100)
    elif task == "SEQ_2_SEQ_LM":
        inputs["labels"] = input_ids(seq=4, seed=2)
    else:
        inputs["labels"] = torch.tensor([0, 2])
    if "multitask" in case:
        inputs["task_ids"] = torch.tensor([1, 0])
    with torch.no_grad():
        out = model(**inputs)
    logits = out.logits[0, -1] if out.logits.dim() == 3 else out.logits[0]
    return [round(v, 6) for v in logits[:4].tolist()], round(out.loss.item(), 6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_method_outputs_are_pinned(case: str) -> None:
    logits, loss = _outputs(case)
    if os.environ.get("PROMPT_REFERENCE_PRINT"):
        print(f"    {case!r}: ({logits}, {loss}),")
        return
    expected_logits, expected_loss = REFERENCE[case]
    torch.testing.assert_close(torch.tensor(logits), torch.tensor(expected_logits), atol=1e-4, rtol=0)
    assert abs(loss - expected_loss) < 1e-4
