"""The fused LoRA / DoRA linear (peft_engine/tuners/lora/fused.py) against the general path.

The fused node replaces ``base(x)`` + the adapter ops in the common case, with a hand-written
backward; these tests hold its outputs and every gradient (input, A, B, bias, magnitude, a
trainable base weight) to the unfused code, which HF PEFT parity already covers, and check
that the cases it must not take (dropout in training, hooks, autocast, several adapters) fall
back to that code.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peft_engine as pe
from peft_engine.tuners.lora import fused
from tests.conftest import assert_close, output_and_grads, perturb_adapters


class _Net(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _base(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return _Net(nn.Linear(12, 7, bias=bias))
    proj = Conv1D(7, 12)  # (nf=out, nx=in): weight (12, 7)
    nn.init.normal_(proj.weight, std=0.2)
    nn.init.normal_(proj.bias, std=0.2)
    return _Net(proj)


def _pair(kind: str, bias: bool, **kwargs):
    """The same adapted layer twice: one as is, one forced onto the general (unfused) path."""
    config = pe.LoraConfig(target_modules=["proj"], r=3, lora_alpha=5, fan_in_fan_out=kind == "conv1d", **kwargs)
    model = pe.get_peft_model(_base(kind, bias), config)
    perturb_adapters(model)
    reference = copy.deepcopy(model)
    reference.base_model.model.proj._fused_forward = lambda x: None
    return model, reference


CASES = [(kind, bias, dora) for kind in ("linear", "conv1d") for bias in (True, False) for dora in (False, True)
         if kind == "linear" or bias]


@pytest.mark.parametrize(("kind", "bias", "dora"), CASES)
@pytest.mark.parametrize("train_base", ["none", "bias", "weight"])
def test_fused_outputs_and_gradients_equal_general_path(kind, bias, dora, train_base):
    if train_base == "bias" and not bias:
        pytest.skip("no bias")
    model, reference = _pair(kind, bias, use_dora=dora)
    for m in (model, reference):
        base = m.base_model.model.proj.base_layer
        if train_base != "none":
            getattr(base, train_base).requires_grad_(True)
    x = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(3))
    out, grads = output_and_grads(model, x)
    ref_out, ref_grads = output_and_grads(reference, x)
    atol = 1e-5
    assert_close(out, ref_out, atol, "output")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(grads[name], ref_grads[name], atol, name)
    with torch.no_grad():  # inference: the fused forward without an autograd node
        assert_close(model(x), reference(x), atol, "no-grad output")
    model.eval()
    reference.eval()
    assert_close(model(x).detach(), reference(x).detach(), atol, "eval output")


def test_fused_path_is_taken_only_in_the_plain_case():
    model, _ = _pair("linear", True, lora_dropout=0.1)
    layer = model.base_model.model.proj
    x = torch.randn(2, 4, 12, requires_grad=True)

    def fused_node() -> bool:
        return type(model(x).grad_fn).__name__.startswith("_LoraLinear")

    model.train()
    assert not fused_node()  # dropout at work: the base must see x, the adapter dropout(x)
    model.eval()
    assert fused_node()
    module = torch.nn.modules.module
    base = layer.base_layer
    seen: list[torch.nn.Module] = []
    # A hook on the base, or on every module, must see the base run as a module of its own.
    for register in (base.register_forward_hook, base.register_forward_pre_hook, base.register_full_backward_hook,
                     base.register_full_backward_pre_hook, module.register_module_forward_hook,
                     module.register_module_forward_pre_hook, module.register_module_full_backward_hook,
                     module.register_module_full_backward_pre_hook):
        seen.clear()
        handle = register(lambda mod, *args: seen.append(mod))
        model(x).sum().backward()
        handle.remove()
        assert any(m is base for m in seen), register.__name__
        assert fused_node()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_node()
    assert fused_node()


def test_two_active_adapters_and_dora_fall_back_and_agree():
    model, reference = _pair("linear", True)
    config = pe.LoraConfig(target_modules=["proj"], r=2, use_dora=True)
    for m in (model, reference):
        m.add_adapter("other", config)
        m.base_model.set_adapter(["default", "other"])
    perturb_adapters(model, seed=5)
    perturb_adapters(reference, seed=5)
    x = torch.randn(2, 4, 12)
    assert_close(model(x), reference(x), 1e-5, "two active adapters")
    model.base_model.set_adapter("other")
    reference.base_model.set_adapter("other")
    out, grads = output_and_grads(model, x)
    assert type(model(x).grad_fn).__name__.startswith("_DoraLinear")
    ref_out, ref_grads = output_and_grads(reference, x)
    assert_close(out, ref_out, 1e-5, "dora output")
    for name in grads:
        assert_close(grads[name], ref_grads[name], 1e-5, name)


def test_lora_linear_function_matches_autograd_of_the_plain_ops():
    gen = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(6, 10, generator=gen), torch.randn(8, 10, generator=gen), torch.randn(8, generator=gen)
    a, b = torch.randn(4, 10, generator=gen), torch.randn(8, 4, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, bias, a, b)]
    ref_leaves = [t.clone().requires_grad_(True) for t in (x, w, bias, a, b)]
    fused.lora_linear(*leaves, 1.5, False).sum().backward()
    rx, rw, rbias, ra, rb = ref_leaves
    (rx @ rw.T + rbias + 1.5 * (rx @ ra.T) @ rb.T).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        assert_close(got.grad, want.grad, 1e-5)
