"""Quantized bases (bitsandbytes int8 / NF4 / FP4 on CPU): LoRA and DoRA on them, merges, files, LoftQ.

Everything runs on ``tiny-random-llama`` loaded through :func:`peft_engine.load_base`, so the
quantized layers are exactly what a sweep trial gets. The model cache is
``$PEFT_SWEEPS_CACHE`` when set (CI keeps it between runs), else a fresh folder per session.

Tolerances, all measured on these seeded models and stated relative to what they compare:

* Merging re-rounds ``W + dW`` to the quantization grid, so a merged model is close to the
  unmerged one, never equal. Per layer, the merged (dequantized) weight is within
  ``MERGE_WEIGHT_TOL`` of ``W + dW`` relative to ``||dW||`` (int8 1 %, NF4 12 %, FP4 15 %;
  measured at most 0.6 %, 9.8 %, 12.7 %: the grids' own relative rounding error), and the
  logits move by at most ``MERGE_OUTPUT_TOL`` of the adapter's effect ``||unmerged - base||``
  (Frobenius; int8 10 %, NF4 50 %, FP4 60 %; measured up to 3.2 %, 34 %, 40 %). The adapter
  is random and ~4x the size of the base weights, so its effect is of the order of the logits.
* An adapter trained on a quantized base, loaded onto the float base, changes the float model
  the way it changed the quantized one: the logits differ by no more than the quantization
  error of the base itself (``||out_float - out_quant|| <= ||base_float - base_quant||``;
  measured 0.52-0.59 of it in every mode, i.e. 0.5 % (int8) to 8 % (FP4) of the logits).
* LoftQ (4 bits, rank 8): quantized base + initial adapter is closer to the float weights
  than plain NF4 (< 0.95x its error; measured 0.70-0.88x after 1 iteration, 0.62-0.82x after
  2), and the model's logits are closer to the float model's (< 0.9x; measured 0.65x, 0.59x).
* Loading the same file onto the same quantized base, here or in HF PEFT: identical (1e-5).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft_engine import (  # noqa: E402
    LoftQConfig,
    LoraConfig,
    PeftModel,
    get_peft_model,
    load_base,
    prepare_model_for_kbit_training,
)
from peft_engine.quantization import (  # noqa: E402
    QuantizedLoraLinear,
    dequantize_weight,
    is_quantized,
    loftq_decompose,
    quantization_error,
    requantize_weight,
)

MODES = ("int8", "nf4", "fp4")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BNB_TYPE = {"int8": "Linear8bitLt", "nf4": "Linear4bit", "fp4": "Linear4bit"}
MERGE_WEIGHT_TOL = {"int8": 0.01, "nf4": 0.12, "fp4": 0.15}
MERGE_OUTPUT_TOL = {"int8": 0.1, "nf4": 0.5, "fp4": 0.6}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.environ.get("PEFT_SWEEPS_CACHE") or str(tmp_path_factory.mktemp("peft_sweeps_cache"))


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """A fixed batch of token ids (ids < 10 are the tiny tokenizer's special tokens)."""
    return torch.randint(10, 2048, (2, 12), generator=torch.Generator().manual_seed(0))


def _load(cache_dir: str, mode: str = "none", **kwargs) -> nn.Module:
    model, _ = load_base("tiny-random-llama", quantization=mode, cache_dir=cache_dir, **kwargs)
    return model


@torch.no_grad()
def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.detach().clone()


def _lora(model: nn.Module, dora: bool = False, **kwargs) -> PeftModel:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora, task_type="CAUSAL_LM", **kwargs)
    return get_peft_model(model, config)


@torch.no_grad()
def _perturb(peft_model: PeftModel, seed: int = 1) -> None:
    """Random, non-trivial adapter: A and B (init_lora_weights=False) plus noise on DoRA magnitudes,
    so DoRA differs from LoRA (at init its magnitude equals the norm and cancels)."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(peft_model.named_parameters()):
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.3 * torch.randn(param.shape, generator=gen))


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if is_quantized(m)}


def _base_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.data.clone() for n, m in _quantized_layers(model).items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- forward, backward, training ----------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_forward_backward_on_quantized_base(mode: str, dora: bool, cache_dir: str, batch: torch.Tensor) -> None:
    model = _load(cache_dir, mode)
    base = _logits(model, batch)
    peft_model = _lora(model, dora)
    layers = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(layers) == len(TARGETS) * 2
    assert all(type(layer.base_layer).__name__ == BNB_TYPE[mode] for layer in layers)
    # B = 0 at init: the adapter is a no-op and the quantized base runs unchanged.
    torch.testing.assert_close(_logits(peft_model, batch), base, atol=1e-6, rtol=0)

    peft_model = _lora(_load(cache_dir, mode), dora, init_lora_weights=False)
    _perturb(peft_model)
    before = _base_bytes(peft_model)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any("lora_magnitude_vector" in n for n in trainable) == dora
    peft_model.train()
    out = peft_model(input_ids=batch, labels=batch)
    assert torch.isfinite(out.loss) and not torch.allclose(out.logits.detach(), base, atol=1e-3)
    out.loss.backward()
    for name, param in trainable.items():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"
    for name, param in peft_model.named_parameters():
        if name not in trainable:
            assert not param.requires_grad and param.grad is None, name
    after = _base_bytes(peft_model)
    assert len(after) == len(TARGETS) * 2
    for name, data in after.items():
        assert data.dtype in (torch.int8, torch.uint8) and torch.equal(data, before[name]), name


def _adamw_losses(peft_model: PeftModel, batch: torch.Tensor, steps: int = 5) -> list[float]:
    """Train the adapter for ``steps`` AdamW steps (lr 1e-2) on one batch; the loss before each step."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_adamw_steps_reduce_training_loss(mode: str, dora: bool, cache_dir: str, batch: torch.Tensor) -> None:
    torch.manual_seed(0)
    peft_model = _lora(_load(cache_dir, mode), dora)
    frozen = _base_bytes(peft_model)
    losses = _adamw_losses(peft_model, batch)
    with torch.no_grad():
        final = peft_model(input_ids=batch, labels=batch).loss.item()
    assert final < losses[0] - 0.2 and losses == sorted(losses, reverse=True), (losses, final)
    for name, data in _base_bytes(peft_model).items():  # quantized weights untouched by training
        assert torch.equal(data, frozen[name]), name


# ---- merging into quantized weights -------------------------------------------------------------
def _expected_merged(layer: QuantizedLoraLinear, weight: torch.Tensor) -> torch.Tensor:
    """``W + s B A`` (LoRA) or ``m / ||W + s B A|| * (W + s B A)`` per row (DoRA), from the factors."""
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    merged = weight + layer.scaling["default"] * (b @ a)
    if layer.use_dora["default"]:
        magnitude = layer.lora_magnitude_vector["default"].weight.detach()
        merged = merged * (magnitude / merged.norm(dim=1))[:, None]
    return merged


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_merge_into_quantized_weights(mode: str, dora: bool, cache_dir: str, batch: torch.Tensor) -> None:
    model = _load(cache_dir, mode)
    base = _logits(model, batch)
    peft_model = _lora(model, dora, init_lora_weights=False)
    _perturb(peft_model)
    unmerged = _logits(peft_model, batch)
    effect = (unmerged - base).norm()
    layers = {n: m for n, m in peft_model.named_modules() if isinstance(m, QuantizedLoraLinear)}
    before = {n: dequantize_weight(m.base_layer) for n, m in layers.items()}
    expected = {n: _expected_merged(m, before[n]) for n, m in layers.items()}

    peft_model.merge_adapter()
    for name, layer in layers.items():
        assert type(layer.base_layer).__name__ == BNB_TYPE[mode]
        got = dequantize_weight(layer.base_layer)
        error = float((got - expected[name]).norm() / (expected[name] - before[name]).norm())
        assert error < MERGE_WEIGHT_TOL[mode], f"{name}: merged weight off by {error:.3f} of the update"
    merged = _logits(peft_model, batch)
    deviation = float((merged - unmerged).norm() / effect)
    assert deviation < MERGE_OUTPUT_TOL[mode], f"merged logits off by {deviation:.3f} of the adapter's effect"

    peft_model.unmerge_adapter()  # re-rounds again: back near the base, within the same tolerance
    assert float((_logits(peft_model, batch) - unmerged).norm() / effect) < MERGE_OUTPUT_TOL[mode]
    peft_model.merge_adapter()
    again = _logits(peft_model, batch)

    plain = peft_model.merge_and_unload()
    assert not any(isinstance(m, QuantizedLoraLinear) for m in plain.modules())
    for layer in _quantized_layers(plain).values():
        assert type(layer).__name__ == BNB_TYPE[mode]
        if mode != "int8":
            assert layer.weight.quant_state.quant_type == mode and layer.weight.dtype == torch.uint8
        else:
            assert layer.weight.dtype == torch.int8
    assert len(_quantized_layers(plain)) == len(TARGETS) * 2
    torch.testing.assert_close(_logits(plain, batch), again, atol=1e-5, rtol=0)
    assert float((again - unmerged).norm() / effect) < MERGE_OUTPUT_TOL[mode]


# ---- what bitsandbytes moves behind our back ----------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_dequantize_requantize_round_trip(mode: str, cache_dir: str, batch: torch.Tensor) -> None:
    """(De)quantization reads the layer as its forward does, before and after a forward."""
    import peft.utils.integrations as hf

    model = _load(cache_dir, mode)
    layer = model.model.layers[0].mlp.up_proj
    first = dequantize_weight(layer)
    _logits(model, batch)  # int8: the first forward moves the row scales from the weight to layer.state
    after_forward = dequantize_weight(layer)
    torch.testing.assert_close(after_forward, first, atol=0, rtol=0)
    reference = hf.dequantize_bnb_weight(layer.weight, state=getattr(layer, "state", None)).float()
    torch.testing.assert_close(first, reference, atol=1e-6, rtol=1e-6)
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ first.T, atol=0.05, rtol=0.02)  # int8 also rounds x
    requantize_weight(layer, first)  # a value on the grid goes back to itself
    torch.testing.assert_close(dequantize_weight(layer), first, atol=1e-6, rtol=1e-3)
    _logits(model, batch)
    torch.testing.assert_close(dequantize_weight(layer), first, atol=1e-6, rtol=1e-3)


def test_dequantize_reads_the_cpu_packed_4bit_layout(cache_dir: str) -> None:
    """On AVX512-BF16 CPUs, Linear4bit's first no-grad eval forward repacks the weight (with
    bf16 absmax); dequantizing must still give the weight, not the packed bytes' garbage."""
    pack = getattr(bnb.functional, "_convert_weight_packed_for_cpu", None)
    if pack is None:
        pytest.skip("this bitsandbytes has no CPU packed 4-bit layout")
    layer = _load(cache_dir, "nf4").model.layers[0].mlp.up_proj
    plain = dequantize_weight(layer)
    layer.weight.data, layer.weight.quant_state = pack(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(dequantize_weight(layer), plain, atol=1e-6, rtol=8e-3)  # bf16 absmax
    assert layer.weight.quant_state.packing_format_for_cpu  # the layer's own state is left as it was


# ---- adapter files -------------------------------------------------------------------------------
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("mode", MODES)
def test_adapter_trained_on_quantized_base_loads_everywhere(mode: str, dora: bool, cache_dir: str,
                                                            batch: torch.Tensor, tmp_path: Path) -> None:
    import peft

    torch.manual_seed(0)
    peft_model = _lora(_load(cache_dir, mode), dora)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(3):
        peft_model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = _logits(peft_model, batch)
    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_" in k for k in keys), keys  # adapter tensors only, nothing quantized
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is dora

    # (a) our engine, same quantized base
    ours = PeftModel.from_pretrained(_load(cache_dir, mode), tmp_path)
    torch.testing.assert_close(_logits(ours, batch), trained, atol=1e-5, rtol=0)
    # (b) HF PEFT, same quantized base
    theirs = peft.PeftModel.from_pretrained(_load(cache_dir, mode), str(tmp_path))
    assert type(theirs.base_model.model.model.layers[0].self_attn.q_proj).__name__ == BNB_TYPE[mode]
    torch.testing.assert_close(_logits(theirs, batch), trained, atol=1e-5, rtol=0)
    # (c) our engine, the float base: off by no more than the base's own quantization error
    float_base = _load(cache_dir)
    quant_error = (_logits(float_base, batch) - _logits(_load(cache_dir, mode), batch)).norm()
    on_float = _logits(PeftModel.from_pretrained(float_base, tmp_path), batch)
    off = (on_float - trained).norm()
    assert off <= quant_error, f"adapter on the float base off by {off:.4f}, base quantization error {quant_error:.4f}"


# ---- prepare_model_for_kbit_training ------------------------------------------------------------
@pytest.mark.parametrize("mode,dtype", [("int8", "fp16"), ("nf4", "bf16"), ("fp4", "fp16")])
def test_prepare_model_for_kbit_training(mode: str, dtype: str, cache_dir: str, batch: torch.Tensor) -> None:
    import peft

    model = _load(cache_dir, mode, dtype=dtype)
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    quantized = {n: p.data.clone() for n, p in model.named_parameters() if type(p).__name__ in ("Params4bit", "Int8Params")}
    floats = [n for n, p in model.named_parameters() if n not in quantized]
    assert quantized and floats and all(dict(model.named_parameters())[n].dtype == half for n in floats)

    reference = peft.prepare_model_for_kbit_training(_load(cache_dir, mode, dtype=dtype), use_gradient_checkpointing=False)
    model = prepare_model_for_kbit_training(model)
    params = dict(model.named_parameters())
    assert not any(p.requires_grad for p in params.values())
    assert all(params[n].dtype == torch.float32 for n in floats)
    for name, data in quantized.items():  # quantized weights are neither upcast nor touched
        assert type(params[name]).__name__ in ("Params4bit", "Int8Params") and torch.equal(params[name].data, data)
    assert {n: (p.dtype, p.requires_grad) for n, p in params.items()} == {
        n: (p.dtype, p.requires_grad) for n, p in reference.named_parameters()
    }
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    assert checkpointing if checkpointing is not None else model.is_gradient_checkpointing
    # Input gradients: the frozen embedding's output needs grad, so checkpointed blocks backprop.
    assert model.get_input_embeddings()(batch).requires_grad

    peft_model = _lora(model, init_lora_weights=False)
    peft_model.train()
    peft_model(input_ids=batch, labels=batch).loss.backward()
    first = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert first.lora_A["default"].weight.grad.abs().sum() > 0  # through the checkpointed first block

    plain = prepare_model_for_kbit_training(_load(cache_dir, mode, dtype=dtype), use_gradient_checkpointing=False)
    assert not plain.get_input_embeddings()(batch).requires_grad
    assert not (getattr(plain, "is_activation_checkpointing", None) or plain.is_gradient_checkpointing)


# ---- LoftQ ---------------------------------------------------------------------------------------
def _nf4(weight: torch.Tensor) -> torch.Tensor:
    """Plain NF4 (bitsandbytes, blocksize 64: what load_base's nf4 gives), dequantized."""
    packed, state = bnb.functional.quantize_4bit(weight.float().contiguous(), quant_type="nf4", blocksize=64)
    return bnb.functional.dequantize_4bit(packed, state)


def _weights(source: str, cache_dir: str) -> dict[str, torch.Tensor]:
    if source == "random":
        gen = torch.Generator().manual_seed(3)
        # 192 wide: on AVX512 CPUs bitsandbytes 0.50's quantize_4bit and dequantize_4bit disagree for
        # some 2-D shapes (96 x 160 among them: dequant(quant(dequant(quant(w)))) moves by 0.04), so
        # "Q lies on the NF4 grid" would test bitsandbytes, not LoftQ.
        return {"random": 0.02 * torch.randn(96, 192, generator=gen)}
    model = _load(cache_dir)
    return {n: m.weight.detach().float() for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}


@pytest.mark.parametrize("source", ["random", "tiny-llama"])
def test_loftq_beats_plain_quantization(source: str, cache_dir: str) -> None:
    r, scaling = 8, 2.0
    for name, weight in _weights(source, cache_dir).items():
        plain = quantization_error(weight, _nf4(weight))
        errors = []
        for iters in (1, 2):
            q, a, b = loftq_decompose(weight, r, scaling, bits=4, iters=iters)
            assert a.shape == (r, weight.shape[1]) and b.shape == (weight.shape[0], r)
            torch.testing.assert_close(_nf4(q), q, atol=1e-7, rtol=0)  # Q lies on the NF4 grid
            if iters == 1:
                torch.testing.assert_close(q, _nf4(weight), atol=0, rtol=0)  # first Q is the plain base
            errors.append(quantization_error(weight, q + scaling * (b @ a)))
        assert errors[0] < 0.95 * plain, (name, plain, errors)
        assert errors[1] <= errors[0] * (1 + 1e-4), (name, errors)  # more iterations: not worse


@pytest.mark.parametrize("iters", [1, 2])
def test_loftq_init_on_model_is_closer_than_plain_quantization(iters: int, cache_dir: str,
                                                               batch: torch.Tensor) -> None:
    reference = _logits(_load(cache_dir), batch)
    plain_error = _rel(_logits(_load(cache_dir, "nf4"), batch), reference)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=iters))
    assert config.loftq_config == {"loftq_bits": 4, "loftq_iter": iters}
    peft_model = get_peft_model(_load(cache_dir), config)
    loftq_error = _rel(_logits(peft_model, batch), reference)
    assert loftq_error < 0.9 * plain_error, (loftq_error, plain_error)
    for name, module in peft_model.named_modules():  # the base now holds Q: NF4 loses nothing more
        if isinstance(module, nn.Linear) and name.endswith(".base_layer"):
            torch.testing.assert_close(_nf4(module.weight.data), module.weight.data, atol=1e-7, rtol=0)
    with peft_model.disable_adapter():
        residual_only = _rel(_logits(peft_model, batch), reference)
    assert loftq_error < residual_only
