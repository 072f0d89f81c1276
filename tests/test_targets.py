"""Which modules an adapter wraps: HF PEFT's matching rules, checked against HF PEFT itself."""

from __future__ import annotations

import warnings

import peft
import pytest
from peft.tuners.lora import LoraLayer as HFLoraLayer

import peft_engine as pe
from peft_engine.targets import (
    candidate_module_names,
    default_targets,
    layer_index,
    match_target,
    resolve_target_preset,
    select_targets,
)
from tests.conftest import BUILDERS, tiny_convnet, tiny_llama


def _hf_wrapped(builder: str, **kwargs) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(BUILDERS[builder](), peft.LoraConfig(**kwargs))
    return sorted(n for n, m in model.base_model.model.named_modules() if isinstance(m, HFLoraLayer))


def _ours(builder: str, **kwargs) -> list[str]:
    return sorted(select_targets(BUILDERS[builder](), kwargs.pop("target_modules", None), **kwargs))


SPECS = {
    "suffix-list": ("llama", dict(target_modules=["q_proj", "down_proj"])),
    "dotted-suffix": ("llama", dict(target_modules=["self_attn.q_proj", "mlp.up_proj"])),
    "full-name": ("llama", dict(target_modules=["model.layers.1.self_attn.k_proj"])),
    "regex-fullmatch": ("llama", dict(target_modules=r".*\.(q|v)_proj")),
    "regex-not-search": ("llama", dict(target_modules=r"q_proj")),  # must match the whole name: nothing
    "all-linear-causal": ("llama", dict(target_modules="all-linear")),
    "all-linear-gpt2": ("gpt2", dict(target_modules="all-linear")),
    "all-linear-t5": ("t5", dict(target_modules="all-linear")),
    "all-linear-bert": ("bert", dict(target_modules="all-linear")),
    "exclude-list": ("llama", dict(target_modules="all-linear", exclude_modules=["o_proj", "mlp.down_proj"])),
    "exclude-regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*layers\.0\..*")),
    "layers-list": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0])),
    "layers-int-pattern": ("llama", dict(target_modules=["q_proj"], layers_to_transform=1, layers_pattern="layers")),
    "layers-pattern-list": ("t5", dict(target_modules=["q", "v"], layers_to_transform=[1], layers_pattern=["block"])),
    "layers-gpt2-h": ("gpt2", dict(target_modules=["c_attn"], layers_to_transform=[1])),
    "conv-modules": ("convnet", dict(target_modules=["conv1d", "conv2d", "emb"])),
}


@pytest.mark.parametrize("spec", list(SPECS))
def test_selected_modules_equal_hf_peft_s(spec):
    builder, kwargs = SPECS[spec]
    if spec == "regex-not-search":
        with pytest.raises(ValueError, match="matched no module"):
            _ours(builder, **dict(kwargs))
        with pytest.raises(ValueError):
            _hf_wrapped(builder, **kwargs)
        return
    assert _ours(builder, **dict(kwargs)) == _hf_wrapped(builder, **kwargs)


def test_match_target_rules():
    assert match_target("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert match_target("model.layers.0.self_attn.q_proj", ["self_attn.q_proj"])
    assert not match_target("model.layers.0.self_attn.xq_proj", ["q_proj"])  # suffix at a dot only
    assert match_target("model.layers.0.self_attn.q_proj", r".*q_proj")
    assert not match_target("model.layers.0.self_attn.q_proj", r"q_proj")  # a string is a full-match regex
    assert not match_target("anything", None)


def test_layer_index():
    assert layer_index("model.layers.3.mlp.up_proj") == 3
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q", "block") == 2
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q", ["layer"]) == 0
    assert layer_index("lm_head") is None


def test_no_match_lists_candidate_module_names():
    with pytest.raises(ValueError) as err:
        pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["qproj"]))
    message = str(err.value)
    assert "target_modules=['qproj'] matched no module of LlamaForCausalLM" in message
    for name in ("q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"):
        assert name in message
    with pytest.raises(ValueError, match="candidate modules: conv1d, conv2d, emb, head, lin"):
        pe.get_peft_model(tiny_convnet(), pe.LoraConfig(target_modules=["conv3d"]))
    with pytest.raises(ValueError, match=r"matched no module of LlamaForCausalLM after .*layers_to_transform=\[7\]"):
        pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"], layers_to_transform=[7]))


def test_candidates_of_a_wrapped_model_are_its_modules_not_adapter_insides():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    names = candidate_module_names(model.get_base_model())
    assert "q_proj" in names and "lm_head" in names
    assert not {"base_layer", "default", "lora_A", "original_module"} & set(names)


def test_no_defaults_for_an_unknown_architecture():
    with pytest.raises(ValueError, match="no default targets for model_type=None.*candidate modules: conv1d"):
        default_targets(tiny_convnet())


def test_presets_resolve_per_architecture():
    llama = tiny_llama()
    assert resolve_target_preset("attention", llama) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_target_preset("mlp", llama) == ["gate_proj", "up_proj", "down_proj"]
    assert resolve_target_preset("all-linear", llama) == "all-linear"
    assert resolve_target_preset(["x"], llama) == ["x"]
    with pytest.raises(ValueError, match="targets='attention' has no module list for model_type=None"):
        resolve_target_preset("attention", tiny_convnet())
    for arch in ("gpt2", "bert", "t5"):
        model = BUILDERS[arch]()
        for preset in ("attention", "mlp"):
            assert select_targets(model, resolve_target_preset(preset, model)), (arch, preset)
