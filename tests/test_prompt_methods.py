"""Prompt-learning methods and adaption prompts, checked against HF PEFT 0.21.2 (test-only reference).

For every method x model family it applies to, the same base weights get the same adapter
weights in both libraries; forward logits and loss must agree to 1e-5 and greedy generation
must give the same token ids. Files go both ways: HF PEFT's folder loads here, ours loads in
HF PEFT, and each reproduces the other's outputs.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft_engine as pe
from tests.conftest import (
    assert_close,
    input_ids,
    tiny_bart,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
    tiny_mistral,
    tiny_roberta,
    tiny_t5,
)

peft = pytest.importorskip("peft")

FAMILIES = {
    "llama": (tiny_llama, "CAUSAL_LM"),
    "gpt2": (tiny_gpt2, "CAUSAL_LM"),
    "mistral": (tiny_mistral, "CAUSAL_LM"),
    "t5": (tiny_t5, "SEQ_2_SEQ_LM"),
    "bart": (tiny_bart, "SEQ_2_SEQ_LM"),
    "bert": (tiny_bert, "SEQ_CLS"),
    "roberta": (tiny_roberta, "SEQ_CLS"),
}
N = 3  # virtual tokens
METHODS = {
    "prompt_tuning": ("PromptTuningConfig", {"num_virtual_tokens": N}),
    "prefix": ("PrefixTuningConfig", {"num_virtual_tokens": N}),
    "prefix_projection": ("PrefixTuningConfig", {"num_virtual_tokens": N, "prefix_projection": True,
                                                 "encoder_hidden_size": 12}),
    "p_tuning_mlp": ("PromptEncoderConfig", {"num_virtual_tokens": N, "encoder_hidden_size": 12}),
    "p_tuning_lstm": ("PromptEncoderConfig", {"num_virtual_tokens": N, "encoder_hidden_size": 12,
                                              "encoder_reparameterization_type": "LSTM"}),
    "multitask": ("MultitaskPromptTuningConfig", {"num_virtual_tokens": N, "num_tasks": 2, "num_ranks": 2}),
    "adaption_prompt": ("AdaptionPromptConfig", {"adapter_len": 3, "adapter_layers": 1}),
}
PROMPT_FAMILIES = ("llama", "gpt2", "t5", "bart", "bert", "roberta")
CASES = [(m, f) for m in METHODS if m != "adaption_prompt" for f in PROMPT_FAMILIES]
CASES += [("adaption_prompt", f) for f in ("llama", "mistral", "gpt2")]


# ---- building identical pairs ---------------------------------------------------------------
def _configs(method: str, family: str, **overrides):
    cls_name, fields = METHODS[method]
    fields = {**fields, "task_type": FAMILIES[family][1], **overrides}
    return getattr(pe, cls_name)(**fields), getattr(peft, cls_name)(**fields)


def _our_name(hf_name: str) -> str:
    """HF PEFT parameter name -> ours (prompt encoders live on our tuner; heads under base_model.model)."""
    if hf_name.startswith("prompt_encoder."):
        return "base_model." + hf_name
    if ".adaption_" in hf_name:
        return hf_name + ".default"
    return "base_model.model." + hf_name[len("base_model."):]


@torch.no_grad()
def _share_weights(hf_model, ours, seed: int = 7) -> None:
    """Give both models' adapters the same (non-trivial) values; their trainable sets must match."""
    hf_params = {n: p for n, p in hf_model.named_parameters() if p.requires_grad}
    our_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert {_our_name(n) for n in hf_params} == set(our_params)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(hf_params):
        value = 0.5 * torch.randn(hf_params[name].shape, generator=gen)
        hf_params[name].copy_(value)
        our_params[_our_name(name)].copy_(value)


def _pair(method: str, family: str, **overrides):
    build, _ = FAMILIES[family]
    ours_cfg, hf_cfg = _configs(method, family, **overrides)
    hf_model = peft.get_peft_model(build(), hf_cfg)
    ours = pe.get_peft_model(build(), ours_cfg)
    _share_weights(hf_model, ours)
    return hf_model.eval(), ours.eval()


def _inputs(method: str, family: str, labels: bool = True) -> dict:
    task = FAMILIES[family][1]
    ids = input_ids(seq=6)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in the second example
    out = {"input_ids": ids, "attention_mask": mask}
    if labels:
        if task == "CAUSAL_LM":
            out["labels"] = ids.masked_fill(mask == 0, -100)
        elif task == "SEQ_2_SEQ_LM":
            out["labels"] = input_ids(seq=4, seed=2)
        else:
            out["labels"] = torch.tensor([0, 2])
    if method == "multitask":
        out["task_ids"] = torch.tensor([0, 1])
    return out


def _generate(model, method: str, family: str, **extra) -> torch.Tensor:
    inputs = _inputs(method, family, labels=False)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0, **extra)


def _forward(model, method: str, family: str):
    with torch.no_grad():
        return model(**_inputs(method, family))


# ---- parity -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "family"), CASES)
def test_forward_loss_and_generate_match_hf_peft(method: str, family: str) -> None:
    hf_model, ours = _pair(method, family)
    expected, actual = _forward(hf_model, method, family), _forward(ours, method, family)
    assert_close(actual.logits, expected.logits, what=f"{method}/{family} logits")
    assert_close(actual.loss, expected.loss, what=f"{method}/{family} loss")
    if FAMILIES[family][1] != "SEQ_CLS":
        assert torch.equal(_generate(ours, method, family), _generate(hf_model, method, family))


@pytest.mark.parametrize(("method", "family"), CASES)
def test_files_load_both_ways(method: str, family: str, tmp_path) -> None:
    build, task = FAMILIES[family]
    hf_model, ours = _pair(method, family)
    expected = _forward(hf_model, method, family).logits
    hf_model.save_pretrained(tmp_path / "hf")
    ours.save_pretrained(tmp_path / "ours")

    hf_file, our_file = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("hf", "ours"))
    assert set(our_file) == set(hf_file)
    for key in hf_file:
        assert_close(our_file[key], hf_file[key], what=key)
    hf_json, our_json = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("hf", "ours"))
    assert set(our_json) == set(hf_json)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "unknown key" complaints either way
        ours_from_hf = pe.PeftModel.from_pretrained(build(), str(tmp_path / "hf")).eval()
    hf_from_ours = peft.PeftModel.from_pretrained(build(), str(tmp_path / "ours")).eval()
    assert_close(_forward(ours_from_hf, method, family).logits, expected, what="HF file loaded here")
    assert_close(_forward(hf_from_ours, method, family).logits, expected, what="our file loaded in HF PEFT")
    if task != "SEQ_CLS":
        assert torch.equal(_generate(ours_from_hf, method, family), _generate(hf_model, method, family))
    assert not any(p.requires_grad for p in ours_from_hf.parameters())


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix", "multitask"])
def test_beam_search_matches_hf_peft(method: str) -> None:
    hf_model, ours = _pair(method, "llama")
    assert torch.equal(_generate(ours, method, "llama", num_beams=2), _generate(hf_model, method, "llama", num_beams=2))


def test_quantized_4bit_base_with_prompt_tuning(tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama().save_pretrained(tmp_path / "base")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)

    def load():
        return AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu")

    config = {"task_type": "CAUSAL_LM", "num_virtual_tokens": N}
    ours = pe.get_peft_model(load(), pe.PromptTuningConfig(**config))
    assert type(ours.get_base_model().model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    hf_model = peft.get_peft_model(load(), peft.PromptTuningConfig(**config))
    _share_weights(hf_model, ours)
    inputs = _inputs("prompt_tuning", "llama")
    out = ours(**inputs)
    out.loss.backward()
    assert [n for n, p in ours.named_parameters() if p.grad is not None] == \
        ["base_model.prompt_encoder.default.embedding.weight"]
    with torch.no_grad():
        assert_close(ours(**inputs).logits, hf_model(**inputs).logits, what="4-bit prompt tuning")
    assert torch.equal(_generate(ours, "prompt_tuning", "llama"), _generate(hf_model, "prompt_tuning", "llama"))


@pytest.mark.parametrize(("method", "family", "extra"), [
    ("prompt_tuning", "bert", "token_type_ids"),  # classifiers keep token types, zero for virtual tokens
    ("prefix", "bert", "token_type_ids"),
    ("prefix", "llama", "position_ids"),  # prefix positions continue after the virtual tokens
])
def test_token_types_and_positions_match_hf_peft(method: str, family: str, extra: str) -> None:
    hf_model, ours = _pair(method, family)
    inputs = _inputs(method, family)
    if extra == "token_type_ids":
        inputs[extra] = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    else:
        inputs[extra] = torch.arange(6).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        assert_close(ours(**inputs).logits, hf_model(**inputs).logits, what=f"{method}/{family} with {extra}")


# ---- behaviour beyond parity ------------------------------------------------------------------
def test_causal_labels_and_mask_cover_the_virtual_tokens() -> None:
    _, ours = _pair("prompt_tuning", "llama")
    inputs = _inputs("prompt_tuning", "llama")
    out = _forward(ours, "prompt_tuning", "llama")
    assert out.logits.shape[1] == N + inputs["input_ids"].shape[1]
    labels = torch.cat((torch.full((2, N), -100), inputs["labels"]), dim=1)
    shift = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                              labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, shift, what="loss ignores virtual tokens")


def test_only_prompt_parameters_train() -> None:
    _, ours = _pair("p_tuning_lstm", "bert")
    ours.train()
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    ours(**_inputs("p_tuning_lstm", "bert")).loss.backward()
    grads = {n for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(".prompt_encoder." in n or ".modules_to_save." in n for n in grads)
    assert any(".lstm_head." in n for n in grads) and any("classifier.modules_to_save" in n for n in grads)
    assert all(torch.equal(p, before[n]) for n, p in ours.named_parameters() if n in before)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix"])
def test_manual_cache_continuation_matches_full_forward(method: str) -> None:
    _, ours = _pair(method, "llama")
    ids = input_ids(seq=6)
    with torch.no_grad():
        full = ours(input_ids=ids).logits[:, -1]
        first = ours(input_ids=ids[:, :5], use_cache=True)
        step = ours(input_ids=ids[:, 5:], past_key_values=first.past_key_values).logits[:, -1]
    assert_close(step, full, what="second step with the cache")


def test_disable_adapter_gives_the_base_model() -> None:
    _, ours = _pair("prefix", "t5")
    base = tiny_t5().eval()
    inputs = {k: v for k, v in _inputs("prefix", "t5").items()}
    with torch.no_grad(), ours.disable_adapter():
        assert_close(ours(**inputs).logits, base(**inputs).logits, what="disabled")
    with torch.no_grad():
        assert not torch.allclose(ours(**inputs).logits, base(**inputs).logits)


def test_adaption_prompt_starts_as_the_base_model_and_switches_adapters() -> None:
    base = tiny_llama().eval()
    ours = pe.get_peft_model(tiny_llama(), pe.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=2,
                                                                   adapter_layers=2)).eval()
    inputs = _inputs("adaption_prompt", "llama", labels=False)
    with torch.no_grad():
        assert_close(ours(**inputs).logits, base(**inputs).logits, what="zero gate")
    ours.add_adapter("other", pe.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=4, adapter_layers=1))
    with torch.no_grad():
        for param in ours.parameters():
            if param.requires_grad:
                param.fill_(0.3)
    changed = ours(**inputs).logits.detach()
    ours.set_adapter("other")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "base_model.model.model.layers.1.self_attn.adaption_prompt.other",
        "base_model.model.model.layers.1.self_attn.adaption_gate.other"}
    with torch.no_grad():
        assert_close(ours(**inputs).logits, base(**inputs).logits, what="'other' still has a zero gate")
    ours.delete_adapter("other")
    assert ours.active_adapter == "default"
    assert_close(ours(**inputs).logits.detach(), changed, what="back to default")
    bare = ours.base_model.unload()
    assert not any(".adaption_" in n for n, _ in bare.named_parameters())


def test_several_prompt_adapters_switch_and_delete() -> None:
    _, ours = _pair("prompt_tuning", "llama")
    inputs = _inputs("prompt_tuning", "llama", labels=False)
    first = ours(**inputs).logits.detach()
    ours.add_adapter("other", pe.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    assert_close(ours(**inputs).logits.detach(), first, what="a new adapter is not active")
    ours.set_adapter("other")
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        "base_model.prompt_encoder.other.embedding.weight"}
    assert ours(**inputs).logits.shape[1] == 5 + 6
    with torch.no_grad():
        batch = ours(**inputs, adapter_names=["default", "default"]).logits  # one adapter for all: allowed
    assert_close(batch, first, what="adapter_names naming one adapter")
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"]
    assert_close(ours(**inputs).logits.detach(), first, what="after deleting 'other'")


def test_multitask_task_ids() -> None:
    _, ours = _pair("multitask", "llama")
    inputs = _inputs("multitask", "llama", labels=False)
    with torch.no_grad():
        a = ours(**{**inputs, "task_ids": torch.tensor([0, 0])}).logits
        b = ours(**{**inputs, "task_ids": torch.tensor([1, 1])}).logits
        assert not torch.allclose(a, b)
        with pytest.raises(ValueError, match="task_ids=None"):
            ours(**{k: v for k, v in inputs.items() if k != "task_ids"})
        with pytest.raises(ValueError, match=r"task_ids=\[0, 5\]"):
            ours(**{**inputs, "task_ids": torch.tensor([0, 5])})
    single = pe.get_peft_model(tiny_llama(), pe.MultitaskPromptTuningConfig(task_type="CAUSAL_LM",
                                                                             num_virtual_tokens=N))
    single(input_ids=inputs["input_ids"])  # one task: task_ids may be left out


def test_multitask_source_task_init_matches_hf_peft(tmp_path) -> None:
    source = {"prompt_embeddings": torch.randn(N, 16), "prefix_task_cols": torch.randn(3, N, 2),
              "prefix_task_rows": torch.randn(3, 2, 16)}
    path = str(tmp_path / "source.safetensors")
    save_file(source, path)
    fields = {"task_type": "CAUSAL_LM", "num_virtual_tokens": N, "num_ranks": 2,
              "prompt_tuning_init": "AVERAGE_SOURCE_TASKS", "prompt_tuning_init_state_dict_path": path}
    ours = pe.get_peft_model(tiny_llama(), pe.MultitaskPromptTuningConfig(**fields))
    hf_model = peft.get_peft_model(tiny_llama(), peft.MultitaskPromptTuningConfig(**fields))
    for key, value in hf_model.prompt_encoder["default"].state_dict().items():
        assert_close(ours.base_model.prompt_encoder["default"].state_dict()[key], value, what=key)
    bad = pe.MultitaskPromptTuningConfig(**{**fields, "prompt_tuning_init_state_dict_path": str(tmp_path / "x.bin")})
    with pytest.raises(ValueError, match="safetensors"):
        pe.get_peft_model(tiny_llama(), bad)


def test_reparameterized_adapter_loaded_for_training_keeps_its_outputs(tmp_path) -> None:
    _, ours = _pair("p_tuning_mlp", "llama")
    expected = _forward(ours, "p_tuning_mlp", "llama").logits
    ours.save_pretrained(tmp_path)
    again = pe.PeftModel.from_pretrained(tiny_llama(), str(tmp_path), is_trainable=True).eval()
    assert_close(_forward(again, "p_tuning_mlp", "llama").logits, expected, what="loaded trainable")
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        "base_model.prompt_encoder.default.embedding.weight"}


# ---- prompt tuning initialisations -------------------------------------------------------------
def _local_tokenizer(folder: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "classify", "the", "review", "sentiment"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder, local_files_only=True)  # knows its folder


def test_text_init_reads_a_local_tokenizer_like_hf_peft(tmp_path) -> None:
    tokenizer = _local_tokenizer(str(tmp_path))
    fields = {"task_type": "CAUSAL_LM", "num_virtual_tokens": 5, "prompt_tuning_init": "TEXT",
              "prompt_tuning_init_text": "classify the review"}
    base = tiny_llama()
    expected = base.get_input_embeddings().weight[torch.tensor([2, 3, 4, 2, 3])]
    for source in (str(tmp_path), tokenizer):
        ours = pe.get_peft_model(tiny_llama(), pe.PromptTuningConfig(**fields, tokenizer_name_or_path=source))
        assert_close(ours.base_model.prompt_encoder["default"].embedding.weight, expected, what=f"TEXT via {source!r}")
    hf_model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(**fields, tokenizer_name_or_path=str(tmp_path)))
    assert_close(hf_model.prompt_encoder["default"].embedding.weight, expected, what="HF PEFT TEXT init")
    ours.save_pretrained(tmp_path / "saved")  # a tokenizer object is recorded by its path, the file loads
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    assert saved["tokenizer_name_or_path"] == str(tmp_path)
    loaded = pe.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "saved"))
    assert_close(loaded.base_model.prompt_encoder["default"].embedding.weight, expected, what="reloaded")


def test_text_init_never_goes_to_the_hub() -> None:
    config = pe.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, prompt_tuning_init="TEXT",
                                   prompt_tuning_init_text="hi", tokenizer_name_or_path="some-org/some-model")
    with pytest.raises(ValueError, match="never downloads"):
        pe.get_peft_model(tiny_llama(), config)


def test_sample_vocab_init_uses_vocabulary_rows() -> None:
    ours = pe.get_peft_model(tiny_llama(), pe.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                                prompt_tuning_init="SAMPLE_VOCAB"))
    vocab = ours.get_base_model().get_input_embeddings().weight
    for row in ours.base_model.prompt_encoder["default"].embedding.weight:
        assert (vocab == row).all(dim=1).any()


# ---- bad input, registry ------------------------------------------------------------------------
@pytest.mark.parametrize(("cls", "fields", "match"), [
    ("PromptTuningConfig", {"num_virtual_tokens": 0}, "num_virtual_tokens=0"),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "prompt_tuning_init": "WORDS"}, "prompt_tuning_init='WORDS'"),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT"}, "tokenizer_name_or_path=None"),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "task_type": "TOKEN_CLS"}, "task_type='TOKEN_CLS'"),
    ("PromptEncoderConfig", {"num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"},
     "encoder_reparameterization_type='GRU'"),
    ("PrefixTuningConfig", {"num_virtual_tokens": 2, "init_weights": "ones"}, "init_weights='ones'"),
    ("MultitaskPromptTuningConfig", {"num_virtual_tokens": 2, "num_tasks": 0}, "num_tasks=0"),
    ("AdaptionPromptConfig", {"adapter_len": 2}, "adapter_layers=None"),
])
def test_bad_config_values_name_the_field(cls: str, fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        getattr(pe, cls)(**fields)


def test_unsupported_models_and_settings_fail_clearly() -> None:
    with pytest.raises(ValueError, match="model_type='t5'"):
        pe.get_peft_model(tiny_t5(), pe.AdaptionPromptConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(ValueError, match="adapter_layers=5"):
        pe.get_peft_model(tiny_llama(), pe.AdaptionPromptConfig(adapter_len=2, adapter_layers=5))
    with pytest.raises(ValueError, match="task_type=None"):
        pe.get_peft_model(tiny_llama(), pe.PromptTuningConfig(num_virtual_tokens=2))
    model = tiny_llama()
    model.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pe.get_peft_model(model, pe.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    _, ours = _pair("prompt_tuning", "llama")
    with pytest.raises(NotImplementedError, match="cannot mix adapters"):
        ours(**_inputs("prompt_tuning", "llama"), adapter_names=["default", "__base__"])
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        ours.merge_and_unload()
    bad = {"prompt_embeddings": torch.zeros(N + 1, 16)}
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        pe.set_peft_model_state_dict(ours, bad)


def test_methods_are_registered_for_sweeps() -> None:
    for name, size in [("prompt_tuning", "num_virtual_tokens"), ("prefix_tuning", "num_virtual_tokens"),
                       ("p_tuning", "num_virtual_tokens"), ("multitask_prompt_tuning", "num_virtual_tokens"),
                       ("adaption_prompt", "adapter_len")]:
        spec = pe.get_method(name)
        assert spec.size_field == size and not spec.uses_targets and spec.quantized_bases
        assert "token_dim" not in spec.hyperparameters() and "target_modules" not in spec.hyperparameters()
    config = pe.get_method("prefix_tuning").build_config(
        {"task_type": "CAUSAL_LM", "target_modules": ["q_proj"]}, num_virtual_tokens=4, prefix_projection=True)
    model = pe.get_peft_model(tiny_llama(), config)
    assert model.peft_config["default"].token_dim == 8  # read from the model; GQA: 1 kv head x head_dim 8
    assert pe.get_method("adaption_prompt").build_config(adapter_len=2, adapter_layers=1).target_modules is None
