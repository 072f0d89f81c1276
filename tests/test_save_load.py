"""Adapter files: HF PEFT's safetensors layout, and bad files refused with an error naming the problem."""

from __future__ import annotations

import json
import os
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import peft_engine as pe
from tests.conftest import assert_close, model_inputs, perturb_adapters, run, tiny_llama

WEIGHTS = "adapter_model.safetensors"


def _saved(tmp_path, **kwargs) -> tuple[pe.PeftModel, str]:
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(**{"target_modules": ["q_proj", "v_proj"], **kwargs}))
    perturb_adapters(model)
    folder = os.fspath(tmp_path / "adapter")
    model.save_pretrained(folder)
    return model, folder


def test_file_is_plain_safetensors_with_hf_keys(tmp_path):
    model, folder = _saved(tmp_path, use_dora=True)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", WEIGHTS]
    with safe_open(os.path.join(folder, WEIGHTS), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert not any(".default" in k for k in keys), "adapter names are not part of file keys"
    assert keys == set(pe.get_peft_model_state_dict(model))


def test_state_dict_round_trip_into_another_adapter_name():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True))
    perturb_adapters(model)
    tensors = pe.get_peft_model_state_dict(model)
    other = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj", "v_proj"], use_dora=True),
                              adapter_name="other")
    pe.set_peft_model_state_dict(other, tensors, adapter_name="other")
    inputs = model_inputs(tiny_llama())
    assert_close(run(other, inputs), run(model, inputs), what="state dict copied into adapter 'other'")


def test_old_hf_dora_key_format_loads(tmp_path):
    """HF PEFT < 0.12 stored DoRA magnitudes as ``...lora_magnitude_vector.weight``."""
    model, folder = _saved(tmp_path, use_dora=True)
    path = os.path.join(folder, WEIGHTS)
    tensors = load_file(path)
    save_file({(k + ".weight" if k.endswith("lora_magnitude_vector") else k): v for k, v in tensors.items()}, path)
    loaded = pe.PeftModel.from_pretrained(tiny_llama(), folder)
    inputs = model_inputs(tiny_llama())
    assert_close(run(loaded, inputs), run(model, inputs), 1e-4, "old DoRA key format")


@pytest.mark.parametrize("targets,mode", [(["embed_tokens", "q_proj"], "auto"), (["q_proj"], True),
                                          (["lm_head", "q_proj"], True), (["q_proj"], "auto"),
                                          (["embed_tokens"], False)])
def test_save_embedding_layers_keys_match_hf_and_load_back(targets, mode, tmp_path):
    keys = {}
    for lib in (pe, peft):
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(target_modules=targets))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            keys[lib.__name__] = set(lib.get_peft_model_state_dict(model, save_embedding_layers=mode))
        folder = tmp_path / lib.__name__
        model.save_pretrained(folder, save_embedding_layers=mode)
    assert keys["peft_engine"] == keys["peft"]
    for lib_name in keys:  # files with embedding weights (ours and HF's) load here
        pe.PeftModel.from_pretrained(tiny_llama(), tmp_path / lib_name)


def test_selected_adapters_and_main_process(tmp_path):
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"]))
    model.add_adapter("b", pe.LoraConfig(target_modules=["v_proj"]))
    model.save_pretrained(tmp_path / "only_b", selected_adapters=["b"])
    assert os.listdir(tmp_path / "only_b") == ["b"]
    model.save_pretrained(tmp_path / "none", is_main_process=False)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match=r"selected_adapters \['zzz'\] do not exist; adapters: \['default', 'b'\]"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["zzz"])


# ---- bad files ----------------------------------------------------------------------------------
def _rewrite_weights(folder: str, change) -> None:
    path = os.path.join(folder, WEIGHTS)
    save_file(change(load_file(path)), path)


def test_missing_keys_are_named(tmp_path):
    _, folder = _saved(tmp_path)
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _rewrite_weights(folder, lambda t: {k: v for k, v in t.items() if k != gone})
    with pytest.raises(ValueError, match=f"does not fit this model's adapter: missing keys: {gone}"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_unexpected_keys_are_named(tmp_path):
    _, folder = _saved(tmp_path)
    extra = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    _rewrite_weights(folder, lambda t: {**t, extra: torch.zeros(8, 16)})
    with pytest.raises(ValueError, match=f"unexpected keys: {extra}"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_shape_mismatch_from_another_rank_is_named(tmp_path):
    _, folder = _saved(tmp_path, r=8)
    other = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj", "v_proj"], r=4))
    save_file({k: v.contiguous() for k, v in pe.get_peft_model_state_dict(other).items()},
              os.path.join(folder, WEIGHTS))
    with pytest.raises(ValueError, match=r"lora_A.weight has shape \(4, 16\) but the model expects \(8, 16\)"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_set_state_dict_refuses_a_partial_dict():
    model = pe.get_peft_model(tiny_llama(), pe.LoraConfig(target_modules=["q_proj"]))
    tensors = pe.get_peft_model_state_dict(model)
    tensors.pop(sorted(tensors)[0])
    with pytest.raises(ValueError, match="missing keys: base_model.model.model.layers.0.self_attn.q_proj.lora_A"):
        pe.set_peft_model_state_dict(model, tensors)


def test_truncated_safetensors_file(tmp_path):
    _, folder = _saved(tmp_path)
    path = os.path.join(folder, WEIGHTS)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{WEIGHTS}: not a readable safetensors adapter file"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_corrupt_config_json(tmp_path):
    _, folder = _saved(tmp_path)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        f.write('{"peft_type": "LORA", "r": ')
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_pickle_only_adapter_is_refused_without_unpickling(tmp_path):
    model, folder = _saved(tmp_path)
    os.remove(os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, "adapter_model.bin"), "wb") as f:
        f.write(b"\x80\x04 not read: loading it would run arbitrary code")
    with pytest.raises(ValueError, match="only a pickled adapter_model.bin is there; peft_engine loads safetensors only"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_missing_folder_or_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        pe.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    _, folder = _saved(tmp_path)
    os.remove(os.path.join(folder, WEIGHTS))
    with pytest.raises(FileNotFoundError, match=f"no {WEIGHTS} next to adapter_config.json"):
        pe.PeftModel.from_pretrained(tiny_llama(), folder)


def test_config_with_unknown_keys_still_loads_the_weights(tmp_path):
    model, folder = _saved(tmp_path)
    path = os.path.join(folder, "adapter_config.json")
    data = json.loads(open(path).read())
    data["option_from_the_future"] = {"x": 1}
    open(path, "w").write(json.dumps(data))
    with pytest.warns(UserWarning, match="option_from_the_future"):
        loaded = pe.PeftModel.from_pretrained(tiny_llama(), folder)
    inputs = model_inputs(tiny_llama())
    assert_close(run(loaded, inputs), run(model, inputs))


@pytest.mark.parametrize("init", ["pissa", "olora", "loftq"])
def test_inits_that_rewrite_the_base_round_trip(init, tmp_path):
    """The file holds A, B for the residual base; loading onto the original model rebuilds that residual."""
    kwargs = {"loftq_config": pe.LoftQConfig(loftq_bits=4)} if init == "loftq" else {}
    model, folder = _saved(tmp_path, init_lora_weights=init, r=4, **kwargs)
    loaded = pe.PeftModel.from_pretrained(tiny_llama(), folder)
    inputs = model_inputs(tiny_llama())
    assert_close(run(loaded, inputs), run(model, inputs), what=f"{init} saved -> loaded")
