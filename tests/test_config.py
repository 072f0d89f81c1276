"""Adapter configs: validation with errors that name the field, the value and what is allowed,
and ``adapter_config.json`` read and written exactly as HF PEFT 0.21.2 does."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import peft
import pytest

import peft_engine as pe
from peft_engine.config import PeftConfig
from tests.conftest import hf_config, tiny_llama

BAD_LORA_VALUES = [
    ("r", 0, "r=0 is not allowed; allowed: an integer > 0"),
    ("r", 2.5, "r=2.5 is not allowed; allowed: an integer > 0"),
    ("lora_alpha", -1, "lora_alpha=-1 is not allowed; allowed: a number > 0"),
    ("bias", "x", "bias='x' is not allowed; allowed: 'none', 'all', 'lora_only'"),
    ("lora_dropout", 1.5, r"lora_dropout=1.5 is not allowed; allowed: a number in \[0, 1\)"),
    ("lora_dropout", -0.1, r"lora_dropout=-0.1 is not allowed"),
    ("init_lora_weights", "foo", "init_lora_weights='foo' is not allowed; allowed: True, False, 'gaussian', 'pissa'"),
    ("task_type", "foo", "task_type='foo' is not allowed; allowed: 'CAUSAL_LM'"),
    ("use_dora", "yes", "use_dora='yes' is not allowed; allowed: true, false"),
    ("use_rslora", 1, "use_rslora=1 is not allowed; allowed: true, false"),
    ("rank_pattern", {"q_proj": 0}, r"rank_pattern\['q_proj'\]=0 is not allowed"),
    ("alpha_pattern", {"q_proj": -2}, r"alpha_pattern\['q_proj'\]=-2 is not allowed"),
    ("rank_pattern", ["q_proj"], "rank_pattern=.* is not allowed; allowed: a mapping"),
    ("loftq_config", {"loftq_bits": 3}, r"loftq_config.loftq_bits=3 is not allowed; allowed: 2, 4, 8"),
]


@pytest.mark.parametrize("field,value,message", BAD_LORA_VALUES, ids=[f"{f}={v!r}" for f, v, _ in BAD_LORA_VALUES])
def test_bad_values_raise_naming_field_value_and_allowed(field, value, message):
    with pytest.raises(ValueError, match=message):
        pe.LoraConfig(**{field: value})


def test_inconsistent_fields_are_refused():
    with pytest.raises(ValueError, match="layers_pattern is only used with layers_to_transform"):
        pe.LoraConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match="layers_to_transform cannot be used with a regex target_modules"):
        pe.LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])
    with pytest.raises(ValueError, match="init_lora_weights='loftq' needs loftq_config"):
        pe.LoraConfig(init_lora_weights="loftq")


def test_defaults_and_field_names_are_hf_peft_s():
    ours = {f.name: f for f in dataclasses.fields(pe.LoraConfig) if f.init}
    hf = {f.name: f for f in dataclasses.fields(peft.LoraConfig) if f.init}
    assert set(ours) <= set(hf), "every field we have is an HF PEFT field"
    ours_cfg, hf_cfg = pe.LoraConfig(), peft.LoraConfig()
    for name in set(ours) - {"peft_type"}:
        assert getattr(ours_cfg, name) == getattr(hf_cfg, name), name
    # HF fields we do not implement are declared, with the value that is safe to ignore.
    assert set(hf) - set(ours) <= set(pe.LoraConfig.UNSUPPORTED_FIELDS) | {"auto_mapping", "peft_version",
                                                                           "runtime_config"}


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_written_json_has_hf_peft_s_fields_and_values(task_type, tmp_path):
    kwargs = dict(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True,
                  rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 8}, modules_to_save=["lm_head"],
                  layers_to_transform=[0, 1], layers_pattern="layers", task_type=task_type)
    ours = pe.get_peft_model(tiny_llama(), pe.LoraConfig(**kwargs))
    hf = peft.get_peft_model(tiny_llama(), hf_config(pe.LoraConfig(**kwargs)))
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    ours_json = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    hf_json = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    assert set(ours_json) == set(hf_json)
    for key in hf_json:
        ours_v, hf_v = ours_json[key], hf_json[key]
        if isinstance(hf_v, list):  # HF PEFT writes sets as lists in arbitrary order
            ours_v, hf_v = sorted(map(str, ours_v)), sorted(map(str, hf_v))
        assert ours_v == hf_v, key
    assert ours_json["inference_mode"] is True  # saved for inference, as HF PEFT does
    if task_type is None:
        assert ours_json["auto_mapping"] == {"base_model_class": "LlamaForCausalLM",
                                             "parent_library": "transformers.models.llama.modeling_llama"}


def test_hf_written_config_reads_back_with_the_same_values(tmp_path):
    hf_cfg = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=32, use_dora=True, bias="lora_only",
                             init_lora_weights="gaussian", exclude_modules=["lm_head"], task_type="SEQ_CLS",
                             rank_pattern={"q": 2})
    hf_cfg.save_pretrained(tmp_path)
    ours = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(ours, pe.LoraConfig)
    for field in dataclasses.fields(ours):
        expected = getattr(hf_cfg, field.name)
        expected = sorted(expected) if isinstance(expected, set) else expected
        assert getattr(ours, field.name) == expected, field.name
    again = pe.LoraConfig.from_dict(ours.to_dict())
    assert again == ours


def test_unknown_keys_warn_and_load(tmp_path):
    data = {**pe.LoraConfig(target_modules=["q_proj"]).to_dict(), "brand_new_option": 3}
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="ignoring keys unknown to peft_engine: brand_new_option"):
        config = PeftConfig.from_pretrained(tmp_path)
    assert config.target_modules == ["q_proj"]


@pytest.mark.parametrize("field,value", [("layer_replication", [[0, 1]]), ("lora_bias", True),
                                         ("use_qalora", True), ("trainable_token_indices", [1, 2])])
def test_known_but_unsupported_fields_at_a_non_neutral_value_are_errors(field, value):
    data = {**pe.LoraConfig().to_dict(), field: value}
    with pytest.raises(NotImplementedError, match=re.escape(f"field {field}={value!r} is not supported by peft_engine")):
        PeftConfig.from_dict(data)


def test_unsupported_fields_at_neutral_or_harmless_values_load_quietly():
    data = {**pe.LoraConfig().to_dict(), "layer_replication": None, "lora_bias": False, "eva_config": {},
            "megatron_core": "something.else", "qalora_group_size": 64}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PeftConfig.from_dict(data)


@pytest.mark.parametrize("content,message", [
    ('{"r": 8, ', "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"r": 8}', "adapter config has no 'peft_type'"),
    ('{"peft_type": "WHAT"}', "peft_type='WHAT' is not supported; allowed: .*LORA"),
    ('{"peft_type": "LORA", "r": 0}', "r=0 is not allowed"),
])
def test_bad_config_files_name_the_problem(content, message, tmp_path):
    (tmp_path / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match=message):
        PeftConfig.from_pretrained(tmp_path)


def test_config_class_and_file_type_must_agree(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        PeftConfig.from_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="peft_type='IA3' does not match LoraConfig"):
        pe.LoraConfig.from_pretrained(tmp_path)


def test_pissa_niter_is_a_clear_error_not_a_silent_fallback(tmp_path):
    """HF PEFT's fast PiSSA variant (randomised SVD) is not implemented: refuse it by name."""
    peft.LoraConfig(init_lora_weights="pissa_niter_4").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="init_lora_weights='pissa_niter_4' is not allowed"):
        PeftConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("key", ["q_proj|v_proj", "v_proj", r"layers\.1\.self_attn\.(q|v)_proj", "proj"])
def test_rank_and_alpha_patterns_match_as_hf_peft_reads_them(key):
    """A pattern key is a regex on the end of the module name, alternations included (LoRA once
    read ``q_proj|v_proj`` as ``(.*\\.)?q_proj`` or exactly ``v_proj``; LyCORIS never did)."""
    from peft.utils.other import get_pattern_key

    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "k_proj", "v_proj")]
    configs = [pe.LoraConfig(r=8, lora_alpha=16, rank_pattern={key: 2}, alpha_pattern={key: 4}),
               pe.LoHaConfig(r=8, alpha=16, rank_pattern={key: 2}, alpha_pattern={key: 4})]
    for config in configs:
        for name in names:
            hit = get_pattern_key([key], name) == key
            assert config.rank_and_alpha(name) == ((2, 4) if hit else (8, 16)), (type(config).__name__, name)


def test_any_saved_config_loads_in_a_fresh_process(tmp_path):
    """Config classes register as they are imported, and peft_engine imports lazily: reading an
    adapter_config.json must not depend on which config classes the caller happened to import."""
    import subprocess
    import sys

    pe.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).save_pretrained(tmp_path)
    code = "import sys; from peft_engine import PeftConfig; print(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)"
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "IA3Config"
