"""Regression cases: a fixed tiny model + an adapter config -> tensors compared with stored references.

A :class:`Case` is run by :func:`compute` the same way every time: seed, build the tiny base
model, seed again, wrap it with ``get_peft_model``, record the adapter's initial state
(``init/<file key>``: catches changes to initialisation such as PiSSA/OLoRA/DoRA magnitudes),
give every trainable tensor fixed seeded values (``conftest.perturb_adapters``) and record the
model's output on fixed inputs (``output``), plus, with ``merge=True``, the output after
``merge_and_unload`` (``merged_output``). :mod:`tests.regression.test_regression` compares
these with ``references/<case name>.safetensors`` (atol 1e-5 by default).

Adding cases (other methods, prompt methods ...)
------------------------------------------------
Put them in your own module next to this one, named ``cases_<something>.py``; it is imported
automatically (see :func:`_load_plugin_modules`). Either define a dict ::

    # tests/regression/cases_ia3.py
    from peft_engine import IA3Config
    from tests.regression.cases import Case

    CASES = {
        "ia3": Case(model="llama", config=lambda: IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                            feedforward_modules=["down_proj"]), merge=True),
    }

or call :func:`register_case` (``register_case("ia3", Case(...))``). ``config`` is a callable so
that building the case list never builds configs. ``model`` is a key of ``tests.conftest.BUILDERS``
or a callable returning a fresh model; ``inputs`` (optional) maps the base model to forward kwargs.
Then create the reference files of the new cases (only the missing ones are written)::

    python -m tests.regression.create            # refused on a dirty git tree, see create.py

A name may be registered once; a duplicate raises, so two files cannot silently fight over a case.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import peft_engine as pe
from tests.conftest import BUILDERS, model_inputs, perturb_adapters, run

REFERENCES = Path(__file__).parent / "references"


@dataclass(frozen=True)
class Case:
    model: str | Callable[[], nn.Module]
    config: Callable[[], pe.PeftConfig]
    inputs: Callable[[nn.Module], dict[str, torch.Tensor]] | None = None
    merge: bool = False  # also record the output after merge_and_unload (weight-adapting methods)
    seed: int = 0
    atol: float = 1e-5
    tags: tuple[str, ...] = field(default_factory=tuple)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.seed)
        return BUILDERS[self.model](seed=self.seed) if isinstance(self.model, str) else self.model()


CASES: dict[str, Case] = {}


def register_case(name: str, case: Case) -> Case:
    if name in CASES:
        raise ValueError(f"regression case {name!r} is registered twice; pick another name")
    if not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"regression case name {name!r}: use letters, digits, '-' and '_' (it names a file)")
    CASES[name] = case
    return case


def reference_path(name: str) -> Path:
    return REFERENCES / f"{name}.safetensors"


@torch.no_grad()
def compute(case: Case) -> dict[str, torch.Tensor]:
    """The tensors a case stores: adapter state right after init, outputs with fixed adapter values."""
    base = case.build_model()
    inputs = case.inputs(base) if case.inputs is not None else model_inputs(base)
    torch.manual_seed(case.seed)
    model = pe.get_peft_model(base, case.config())
    out = {f"init/{k}": v.detach().clone().contiguous() for k, v in pe.get_peft_model_state_dict(model).items()}
    perturb_adapters(model, seed=case.seed + 1)
    out["output"] = run(model, inputs)
    if case.merge:
        out["merged_output"] = run(model.merge_and_unload(), inputs)
    return out


# ---- the LoRA family ----------------------------------------------------------------------------
_LLAMA_ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
_CONV_ALL = ["conv1d", "conv2d", "emb", "lin"]

LORA_CASES: dict[str, Case] = {
    "lora": Case("llama", lambda: pe.LoraConfig(target_modules=_LLAMA_ATTN, r=4, lora_alpha=8), merge=True),
    "lora-gaussian-all-linear": Case("llama", lambda: pe.LoraConfig(target_modules="all-linear",
                                                                    init_lora_weights="gaussian")),
    "dora": Case("llama", lambda: pe.LoraConfig(target_modules="all-linear", use_dora=True), merge=True),
    "rslora": Case("llama", lambda: pe.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16,
                                                  use_rslora=True), merge=True),
    "pissa": Case("llama", lambda: pe.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                 init_lora_weights="pissa")),
    "olora": Case("llama", lambda: pe.LoraConfig(target_modules=["q_proj", "v_proj", "down_proj"], r=4,
                                                 init_lora_weights="olora")),
    "rank-alpha-pattern": Case("llama", lambda: pe.LoraConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 32})),
    "embedding": Case("llama", lambda: pe.LoraConfig(target_modules=["embed_tokens", "q_proj"]), merge=True),
    "dora-embedding": Case("llama", lambda: pe.LoraConfig(target_modules=["embed_tokens"], use_dora=True), merge=True),
    "conv": Case("convnet", lambda: pe.LoraConfig(target_modules=_CONV_ALL), merge=True),
    "dora-conv": Case("convnet", lambda: pe.LoraConfig(target_modules=_CONV_ALL, use_dora=True), merge=True),
    "gpt2-conv1d": Case("gpt2", lambda: pe.LoraConfig(target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True), merge=True),
    "dora-gpt2-conv1d": Case("gpt2", lambda: pe.LoraConfig(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                                           use_dora=True), merge=True),
    "bias-all": Case("gpt2", lambda: pe.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias="all")),
    "modules-to-save-seq-cls": Case("bert", lambda: pe.LoraConfig(target_modules=["query", "value"],
                                                                  task_type="SEQ_CLS")),
    "modules-to-save-lm-head": Case("llama", lambda: pe.LoraConfig(target_modules=["q_proj"],
                                                                   modules_to_save=["lm_head"])),
    "seq2seq-t5": Case("t5", lambda: pe.LoraConfig(target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM"),
                       merge=True),
}
for _name, _case in LORA_CASES.items():
    register_case(_name, _case)


def _load_plugin_modules() -> None:
    """Import every ``tests/regression/cases_*.py`` and register its ``CASES`` dict (if it has one)."""
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda i: i.name):
        if not info.name.startswith("cases_"):
            continue
        module = importlib.import_module(f"{__package__}.{info.name}")
        for name, case in getattr(module, "CASES", {}).items():
            register_case(name, case)


_load_plugin_modules()
