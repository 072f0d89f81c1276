"""LoRA behaviours checked on their own terms: merging, unloading, PiSSA/OLoRA identities,
weighted combinations, what trains, and that failures leave the model as it was.

HF PEFT parity of the same features is in test_lora_parity.py; these tests state the
invariants directly (merged == unmerged outputs, ``W_res + s B A == W`` ...).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peft_engine as pe
from peft_engine.tuners.base import AdapterLayer, ModulesToSaveWrapper
from tests.conftest import (
    BUILDERS,
    assert_close,
    model_inputs,
    perturb_adapters,
    run,
    tiny_gpt2,
    tiny_llama,
    trainable_names,
)

MERGE_CASES = {
    "lora-linear": ("llama", dict(target_modules="all-linear")),
    "lora-embedding": ("llama", dict(target_modules=["embed_tokens", "q_proj"])),
    "lora-gpt2-conv1d-rslora": ("gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                             use_rslora=True)),
    "lora-conv": ("convnet", dict(target_modules=["conv1d", "conv2d", "emb", "lin"])),
    "dora-linear": ("llama", dict(target_modules="all-linear", use_dora=True)),
    "dora-embedding": ("llama", dict(target_modules=["embed_tokens"], use_dora=True)),
    "dora-gpt2-conv1d": ("gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    "dora-conv": ("convnet", dict(target_modules=["conv1d", "conv2d", "emb", "lin"], use_dora=True)),
}


def _model(builder: str, kwargs: dict) -> pe.PeftModel:
    model = pe.get_peft_model(BUILDERS[builder](), pe.LoraConfig(**kwargs))
    perturb_adapters(model)
    return model


def _base_weights(model: pe.PeftModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_unmerge_and_unload(case):
    builder, kwargs = MERGE_CASES[case]
    atol = 1e-4 if kwargs.get("use_dora") else 1e-5
    model = _model(builder, kwargs)
    inputs = model_inputs(model.get_base_model())
    reference = run(model, inputs)
    base_out = run(BUILDERS[builder](), inputs)
    weights = _base_weights(model)

    model.base_model.merge_adapter()
    assert all(layer.merged for layer in model.base_model.adapter_layers())
    assert_close(run(model, inputs), reference, atol, "merged")
    with model.disable_adapter():  # disabling a merged model unmerges it first
        assert_close(run(model, inputs), base_out, atol, "disabled while merged")
    assert_close(run(model, inputs), reference, atol, "after the disabled block")

    model.base_model.merge_adapter()
    model.base_model.unmerge_adapter()
    assert_close(run(model, inputs), reference, atol, "unmerged")
    for key, value in _base_weights(model).items():
        assert_close(value, weights[key], 1e-6, f"base weight {key} after unmerge")

    for safe in (False, True):
        merged = copy.deepcopy(model).merge_and_unload(safe_merge=safe)
        assert not any(isinstance(m, (AdapterLayer, ModulesToSaveWrapper)) for m in merged.modules())
        assert_close(run(merged, inputs), reference, atol, f"merge_and_unload(safe_merge={safe})")

    originals = {name: layer.base_layer for name, layer in model.base_model.named_adapter_layers()}
    plain = model.base_model.unload()
    for name, module in originals.items():
        assert plain.get_submodule(name) is module, f"unload must put back the original {name}"
    assert_close(run(plain, inputs), base_out, 1e-6, "unload")


def test_merge_two_active_adapters_equals_unmerged():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", pe.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, use_dora=True))
    model.base_model.set_adapter(["default", "b"])
    perturb_adapters(model)
    inputs = model_inputs(tiny_llama())
    both = run(model, inputs)
    weights = _base_weights(model)
    model.base_model.merge_adapter(["default", "b"])
    assert_close(run(model, inputs), both, 1e-4, "both merged")
    model.base_model.unmerge_adapter()  # reverse order, each DoRA norm the one it was merged with
    for key, value in _base_weights(model).items():
        assert_close(value, weights[key], 1e-6, key)


def test_safe_merge_refuses_non_finite_weights():
    model = _model("llama", dict(target_modules=["q_proj"]))
    layer = next(model.base_model.adapter_layers())
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(float("inf"))
    before = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="'default'.*NaN/inf"):
        model.base_model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, before)


# ---- PiSSA / OLoRA ----------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("builder,targets", [("llama", ["q_proj", "v_proj", "down_proj"]),
                                             ("gpt2", ["c_attn", "c_fc"])])
def test_pissa_olora_start_at_the_original_model(builder, targets, init):
    original = BUILDERS[builder]()
    inputs = model_inputs(original)
    original_out = run(original, inputs)
    model = pe.get_peft_model(BUILDERS[builder](), pe.LoraConfig(
        target_modules=targets, init_lora_weights=init, r=4, lora_alpha=8, fan_in_fan_out=builder == "gpt2"))
    assert_close(run(model, inputs), original_out, 1e-5, "output right after init")
    for name, layer in model.base_model.named_adapter_layers():
        w = layer.to_dense(original.get_submodule(name).weight)
        w_res = layer.dense_base_weight()
        delta = layer.dense_delta("default")
        assert (w_res - w).abs().max() > 1e-3, f"{name}: the residual must differ from W"
        assert_close(w_res + delta, w, 1e-5, f"{name}: W_res + s B A == W")

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()
    assert (run(model, inputs) - original_out).abs().max() > 1e-4, "one training step must change the output"


def test_pissa_on_embedding_is_refused_clearly():
    with pytest.raises(ValueError, match="pissa.*Linear and Conv1D"):
        pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["embed_tokens"], init_lora_weights="pissa"))


# ---- weighted combinations ----------------------------------------------------------------------
def _combined_model(builder: str, targets: tuple[list[str], list[str]]):
    model = pe.get_peft_model(BUILDERS[builder](), pe.LoraConfig(target_modules=targets[0], lora_alpha=16))
    model.add_adapter("b", pe.LoraConfig(target_modules=targets[1], r=4, lora_alpha=8))
    model.base_model.set_adapter(["default", "b"])
    perturb_adapters(model)
    return model


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_cat_and_full_rank_svd_are_exact_on_every_layer_kind(kind):
    """cat is exact by construction; svd at full rank is too (HF PEFT's svd fails on Conv1d)."""
    model = _combined_model("convnet", (["conv1d", "conv2d", "emb", "lin"], ["conv1d", "lin", "emb"]))
    weights = {"default": 0.7, "b": -0.4}
    model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=kind, svd_rank=32)
    for name, layer in model.base_model.named_adapter_layers():
        expected = sum(w * layer.dense_delta(a) for a, w in weights.items() if a in layer.r)
        assert_close(layer.dense_delta("mix"), expected, 1e-5, f"{kind}: {name}")
    assert model.peft_config["mix"].r == (12 if kind == "cat" else 32)


def test_weighted_adapter_rules():
    model = _combined_model("llama", (["q_proj", "v_proj"], ["q_proj"]))
    with pytest.raises(ValueError, match="combination_type='linear' needs equal ranks"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "x", combination_type="linear")
    with pytest.raises(ValueError, match="combination_type='ties' is not allowed"):
        model.add_weighted_adapter(["default"], [1.0], "x", combination_type="ties")
    with pytest.raises(ValueError, match=r"\['zzz'\] do not exist"):
        model.add_weighted_adapter(["zzz"], [1.0], "x")
    with pytest.raises(ValueError, match="one weight per adapter"):
        model.add_weighted_adapter(["default", "b"], [1.0], "x")
    assert "x" not in model.peft_config
    # One adapter is always "linear": B A scaled by the weight, exactly.
    model.add_weighted_adapter(["b"], [0.5], "scaled", combination_type="svd")
    for _, layer in model.base_model.named_adapter_layers():
        if "b" in layer.r:
            assert_close(layer.dense_delta("scaled"), 0.5 * layer.dense_delta("b"), 1e-6)
    dora = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match="DoRA"):
        dora.add_weighted_adapter(["default"], [1.0], "x")


# ---- what trains ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_only_adapter_tensors_train(bias):
    model = pe.get_peft_model(tiny_gpt2(), pe.LoraConfig(target_modules=["c_attn"], fan_in_fan_out=True, bias=bias,
                                                         modules_to_save=["lm_head"], use_dora=True))
    names = trainable_names(model)
    adapter = {n for n in names if ".lora_" in n or ".modules_to_save.default." in n}
    assert any(".lora_magnitude_vector.default.weight" in n for n in adapter)  # HF PEFT's DoRA parameter name
    biases = names - adapter
    if bias == "none":
        assert biases == set()
    elif bias == "all":
        expected = {n for n, _ in model.named_parameters() if n.endswith("bias") and ".original_module." not in n
                    and ".modules_to_save." not in n}
        assert biases == expected and len(biases) > 4
    else:
        assert biases == {f"base_model.model.transformer.h.{i}.attn.c_attn.base_layer.bias" for i in (0, 1)}


@pytest.mark.parametrize("bias", ["none", "all"])
def test_loading_for_inference_trains_nothing(bias, tmp_path):
    model = _model("gpt2", dict(target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["lm_head"], bias=bias))
    model.save_pretrained(tmp_path)
    assert trainable_names(pe.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)) == set()
    trainable = pe.PeftModel.from_pretrained(tiny_gpt2(), tmp_path, is_trainable=True)
    assert trainable_names(trainable) == trainable_names(model)


# ---- failures leave the model as it was ---------------------------------------------------------
def test_failed_add_adapter_leaves_no_trace():
    model = _model("llama", dict(target_modules=["q_proj"]))
    inputs = model_inputs(tiny_llama())
    before_out, before_params = run(model, inputs), set(dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"matched no module.*candidate modules: .*q_proj"):
        model.add_adapter("bad", pe.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="input_layernorm.*LlamaRMSNorm.*not supported"):
        model.add_adapter("bad", pe.LoraConfig(target_modules=["v_proj", "input_layernorm"]))
    assert list(model.peft_config) == ["default"]
    assert set(dict(model.named_parameters())) == before_params
    assert isinstance(model.get_base_model().model.layers[0].self_attn.v_proj, nn.Linear)  # wrapper removed again
    assert_close(run(model, inputs), before_out, 0.0, "after the failed add_adapter")
    model.add_adapter("bad", pe.LoraConfig(target_modules=["v_proj"]))  # the name is free again


def test_mixed_batch_errors():
    model = _model("llama", dict(target_modules=["q_proj"]))
    inputs = model_inputs(tiny_llama())
    with pytest.raises(ValueError, match=r"unknown adapters \['zzz'\]"):
        model(**inputs, adapter_names=["zzz", "default"])
    with pytest.raises(ValueError, match="1 entries for a batch of 2"):
        model(**inputs, adapter_names=["default"])
    model.base_model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        model(**inputs, adapter_names=["default", "__base__"])


def test_dropout_only_in_training():
    model = _model("llama", dict(target_modules=["q_proj", "v_proj"], lora_dropout=0.5))
    inputs = model_inputs(tiny_llama())
    assert torch.equal(run(model, inputs), run(model, inputs))
    model.train()
    with torch.no_grad():
        first, second = model(**inputs).logits, model(**inputs).logits
    assert not torch.equal(first, second)
