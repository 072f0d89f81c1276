"""Mixed adapter types on one model (``get_peft_model(..., mixed=True)``) against HF PEFT's PeftMixedModel.

LoRA, LoHa, LoKr and OFT adapters overlap on the same modules, so layers nest; with any set of
them active, outputs must equal HF PEFT's for the same weights, merged or not. Each adapter
saves in its own method's layout (HF PEFT loads it as a plain PeftModel) and loads back.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import peft_engine as pe
from peft_engine.tuners.base import AdapterLayer
from tests.conftest import assert_close, model_inputs, run, tiny_llama

peft = pytest.importorskip("peft")

ADAPTERS = [
    ("lora", "LoraConfig", {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_lora_weights": False}),
    ("loha", "LoHaConfig", {"target_modules": ["q_proj", "k_proj"], "r": 2, "init_weights": False}),
    ("lokr", "LoKrConfig", {"target_modules": ["v_proj", "down_proj"], "r": 2, "init_weights": False}),
    ("oft", "OFTConfig", {"target_modules": ["q_proj", "up_proj"], "oft_block_size": 4, "init_weights": False}),
]
NAMES = [name for name, *_ in ADAPTERS]


def _mixed(library):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (first, cls_name, kwargs), *rest = ADAPTERS
        model = library.get_peft_model(tiny_llama(), getattr(library, cls_name)(**kwargs), adapter_name=first,
                                       mixed=True)
        for name, cls_name, kwargs in rest:
            model.add_adapter(name, getattr(library, cls_name)(**kwargs))
    return model


@pytest.fixture(scope="module")
def pair():
    """HF PEFT's mixed model and ours with the same adapter weights (parameter names line up)."""
    hf, ours = _mixed(peft), _mixed(pe)
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == set(hf_params)
    with torch.no_grad():
        for name, param in ours_params.items():
            param.copy_(hf_params[name])
    return hf, ours


@pytest.mark.parametrize("active", [NAMES, ["lora"], ["loha", "lokr"], ["oft", "lora"], ["oft", "loha"]],
                         ids=lambda a: "+".join(a))
def test_outputs_match_hf(pair, active):
    hf, ours = pair
    hf.set_adapter(active)
    ours.set_adapter(active)
    inputs = model_inputs(tiny_llama())
    expected = run(hf, inputs)
    assert (expected - run(tiny_llama(), inputs)).abs().max() > 1e-3
    assert_close(run(ours, inputs), expected, what=f"active={active}")


def test_layers_nest_like_hf(pair):
    _, ours = pair
    q_proj = ours.base_model.model.model.layers[0].self_attn.q_proj
    kinds = [type(layer).__name__ for layer in iter_chain(q_proj)]
    assert kinds == ["OFTLayer", "LoHaLayer", "Linear"]  # LoRA's Linear layer innermost (first added)
    assert type(q_proj.get_base_layer()).__name__ == "Linear" and q_proj.weight is q_proj.get_base_layer().weight


def iter_chain(layer):
    while isinstance(layer, AdapterLayer):
        yield layer
        layer = layer.base_layer


def test_merge_and_unload_match_hf(pair):
    hf, ours = pair
    hf.set_adapter(NAMES)
    ours.set_adapter(NAMES)
    inputs = model_inputs(tiny_llama())
    expected = run(ours, inputs)
    ours_merged = copy.deepcopy(ours)
    ours_merged.base_model.merge_adapter()
    assert_close(run(ours_merged, inputs), expected, what="merged in place")
    ours_merged.base_model.unmerge_adapter()
    assert_close(run(ours_merged, inputs), expected, what="unmerged")
    plain = ours_merged.merge_and_unload()
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert_close(run(plain, inputs), expected, what="merge_and_unload")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_plain = copy.deepcopy(hf).merge_and_unload()
    assert_close(run(plain, inputs), run(hf_plain, inputs), what="HF PEFT's merge_and_unload")
    assert_close(run(copy.deepcopy(ours).unload(), inputs), run(tiny_llama(), inputs), what="unload")


def test_disable_and_delete(pair):
    _, ours = pair
    ours = copy.deepcopy(ours)
    inputs = model_inputs(tiny_llama())
    ours.set_adapter(NAMES)
    with ours.disable_adapter():
        assert_close(run(ours, inputs), run(tiny_llama(), inputs), what="disabled")
    ours.set_adapter(["loha", "lokr"])
    expected = run(ours, inputs)
    ours.delete_adapter(["lora", "oft"])
    assert sorted(ours.peft_config) == ["loha", "lokr"]
    assert_close(run(ours, inputs), expected, what="after deleting inactive adapters")


def test_each_adapter_saves_in_its_method_layout(pair, tmp_path):
    _, ours = pair
    ours.save_pretrained(tmp_path)
    inputs = model_inputs(tiny_llama())
    for name, cls_name, _ in ADAPTERS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            single = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / name)
        assert type(single.peft_config["default"]).__name__ == cls_name
        ours.set_adapter([name])
        assert_close(run(ours, inputs), run(single, inputs), what=f"{name} saved -> HF PEFT")
    reloaded = pe.PeftMixedModel.from_pretrained(tiny_llama(), tmp_path / "lora", adapter_name="lora")
    for name in NAMES[1:]:
        reloaded.load_adapter(tmp_path / name, name)
    reloaded.set_adapter(NAMES)
    ours.set_adapter(NAMES)
    assert_close(run(reloaded, inputs), run(ours, inputs), what="reloaded mixed model")


def test_training_marks_only_active_adapters(pair):
    _, ours = pair
    ours = copy.deepcopy(ours)
    ours.set_adapter(["loha", "oft"])
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable and all((".loha" in n or ".oft" in n) for n in trainable)
    ids = model_inputs(tiny_llama())["input_ids"]
    ours.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in ours.named_parameters() if n in trainable)


def test_refuses_what_cannot_be_mixed():
    with pytest.raises(ValueError, match="cannot be mixed"):
        pe.get_peft_model(tiny_llama(), pe.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), mixed=True)
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"]), mixed=True)
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", pe.LoHaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="cannot add a LOHA adapter"):
        pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"])).add_adapter(
            "x", pe.LoHaConfig(target_modules=["q_proj"]))


def test_failed_add_leaves_the_model_unchanged():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"]), mixed=True)
    inputs = model_inputs(tiny_llama())
    before = run(model, inputs)
    kinds = [type(m).__name__ for m in model.modules()]
    with pytest.raises(ValueError, match="not supported"):  # q_proj is wrapped before the norm layer fails
        model.add_adapter("bad", pe.LoHaConfig(target_modules=["q_proj", "post_attention_layernorm"]))
    assert "bad" not in model.peft_config
    assert [type(m).__name__ for m in model.modules()] == kinds
    assert_close(run(model, inputs), before, what="after a failed add_adapter")
