"""(IA)³, LoHa, LoKr, OFT, BOFT and VeRA checked against HF PEFT 0.21.2 (test-only reference).

For each method and layer kind HF PEFT supports, HF PEFT builds the adapter and random
weights are put into it; its saved folder must load here with the same outputs (1e-5), and
our saved folder must load in HF PEFT with the same outputs — file layout, key names and
config fields included. Then the engine's own contracts per method: merge / unmerge /
merge_and_unload keep outputs, several adapters switch and combine, per-example adapters in
a batch, factored forwards equal the dense formulas, bitsandbytes bases, config errors.
AdaLoRA has its own file (tests/test_adalora.py), mixed adapter types too (tests/test_mixed.py).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peft_engine as pe
from peft_engine.tuners.base import AdapterLayer
from tests.conftest import (
    TinyConvNet,
    assert_close,
    model_inputs,
    perturb_adapters,
    run,
    tiny_convnet,
    tiny_gpt2,
    tiny_llama,
)

peft = pytest.importorskip("peft")



class TinyConvNet1x1(TinyConvNet):
    """A 1x1 Conv2d over 8 channels: the kernel size where HF PEFT's OFT forward is consistent."""

    def __init__(self) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(8, 4, kernel_size=1)
        self.lin = nn.Linear(4, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.conv1d(self.emb(input_ids).transpose(1, 2)).relu()  # (B, 8, T)
        h = self.conv2d(h.unsqueeze(-1)).relu().mean((2, 3))  # (B, 4)
        return self.head(self.lin(h).relu())


def tiny_convnet_1x1(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet1x1().eval()


BUILD = {"llama": tiny_llama, "gpt2": tiny_gpt2, "convnet": tiny_convnet, "convnet1x1": tiny_convnet_1x1}
ATTN = ["q_proj", "v_proj", "down_proj"]
# (id, family, config class, kwargs): every layer kind HF PEFT supports per method.
CASES = [
    ("ia3-llama-defaults", "llama", "IA3Config", {}),
    ("ia3-gpt2-conv1d", "gpt2", "IA3Config", {}),
    ("ia3-conv2d", "convnet", "IA3Config", {"target_modules": ["conv2d", "lin", "head"], "feedforward_modules": ["lin"]}),
    ("ia3-conv2d-ff", "convnet", "IA3Config", {"target_modules": ["conv2d", "lin"], "feedforward_modules": ["conv2d"]}),
    ("loha-linear", "llama", "LoHaConfig", {"target_modules": ATTN, "r": 4, "alpha": 8}),
    ("loha-patterns", "llama", "LoHaConfig", {"target_modules": ATTN, "r": 4, "rank_pattern": {"v_proj": 2},
                                              "alpha_pattern": {"q_proj": 3}}),
    ("loha-conv", "convnet", "LoHaConfig", {"target_modules": ["conv1d", "conv2d", "lin"], "r": 2}),
    ("loha-conv-cp", "convnet", "LoHaConfig", {"target_modules": ["conv1d", "conv2d"], "r": 2,
                                               "use_effective_conv2d": True}),
    ("lokr-linear", "llama", "LoKrConfig", {"target_modules": ATTN, "r": 4}),
    ("lokr-decompose-both", "llama", "LoKrConfig", {"target_modules": ATTN, "r": 1, "decompose_both": True,
                                                    "decompose_factor": 4}),
    ("lokr-conv", "convnet", "LoKrConfig", {"target_modules": ["conv1d", "conv2d", "lin"], "r": 2}),
    ("lokr-conv-cp", "convnet", "LoKrConfig", {"target_modules": ["conv2d", "lin"], "r": 1,
                                               "use_effective_conv2d": True}),
    ("oft-linear", "llama", "OFTConfig", {"target_modules": ATTN, "oft_block_size": 4}),
    ("oft-r-exact-cayley", "llama", "OFTConfig", {"target_modules": ATTN, "r": 2, "oft_block_size": 0,
                                                  "use_cayley_neumann": False}),
    ("oft-share-embedding", "llama", "OFTConfig", {"target_modules": ["q_proj", "embed_tokens"], "oft_block_size": 4,
                                                   "block_share": True, "num_cayley_neumann_terms": 3}),
    ("oft-coft", "llama", "OFTConfig", {"target_modules": ["q_proj", "v_proj"], "oft_block_size": 4, "coft": True,
                                        "eps": 1e-2}),
    ("oft-adjusted-block", "llama", "OFTConfig", {"target_modules": ["q_proj"], "oft_block_size": 5}),
    ("oft-conv-1x1", "convnet1x1", "OFTConfig", {"target_modules": ["conv2d"], "oft_block_size": 2}),
    ("boft-linear", "llama", "BOFTConfig", {"target_modules": ATTN, "boft_block_size": 4}),
    ("boft-blocknum-bias", "llama", "BOFTConfig", {"target_modules": ["q_proj", "v_proj"], "boft_block_size": 0,
                                                   "boft_block_num": 4, "bias": "boft_only"}),
    ("boft-conv", "convnet", "BOFTConfig", {"target_modules": ["conv2d"], "boft_block_size": 3}),
    ("vera-linear", "llama", "VeraConfig", {"target_modules": ATTN, "r": 8}),
    ("vera-conv1d", "gpt2", "VeraConfig", {"target_modules": ["c_attn", "c_fc"], "r": 8}),
    ("vera-no-projection", "llama", "VeraConfig", {"target_modules": ["q_proj", "v_proj"], "r": 8,
                                                   "save_projection": False, "projection_prng_key": 7}),
]


@pytest.fixture(autouse=True)
def _no_boft_cuda_build(monkeypatch):
    """HF PEFT's BOFT tries (and, without CUDA, fails) to compile an extension for every layer: skip that."""
    monkeypatch.setattr(peft.tuners.boft.layer, "get_fbd_cuda", lambda: None)


def _hf_model(family: str, cls_name: str, kwargs: dict, seed: int = 123):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(BUILD[family](), getattr(peft, cls_name)(**kwargs))
    perturb_adapters(model, seed=seed)
    return model.eval()


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """``hf_folder(case)`` -> (folder HF PEFT saved, HF PEFT's outputs); each case built once per module."""
    done: dict[str, tuple] = {}

    def get(case):
        case_id, family, cls_name, kwargs = case
        if case_id not in done:
            hf = _hf_model(family, cls_name, kwargs)
            folder = tmp_path_factory.mktemp(case_id)
            hf.save_pretrained(folder)
            done[case_id] = folder, run(hf, model_inputs(BUILD[family]()))
        return done[case_id]

    return get


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_files_both_ways_same_outputs(case, hf_folder, tmp_path):
    _, family, cls_name, kwargs = case
    folder, expected = hf_folder(case)
    inputs = model_inputs(BUILD[family]())
    assert (expected - run(BUILD[family](), inputs)).abs().max() > 1e-4, "the adapter must change the outputs"

    ours = _quiet(pe.PeftModel.from_pretrained, BUILD[family](), folder)
    assert type(ours.peft_config["default"]).__name__ == cls_name
    assert_close(run(ours, inputs), expected, what=f"{cls_name}: HF file -> peft_engine")

    ours.save_pretrained(tmp_path / "ours")
    back = _quiet(peft.PeftModel.from_pretrained, BUILD[family](), tmp_path / "ours")
    assert_close(run(back, inputs), expected, what=f"{cls_name}: peft_engine file -> HF PEFT")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    hf_config = json.loads((folder / "adapter_config.json").read_text())
    for key, value in ours_config.items():
        if key in hf_config and key not in ("peft_version", "auto_mapping", "base_model_name_or_path"):
            assert _norm(value) == _norm(hf_config[key]), f"{cls_name}: config field {key}"


def _norm(value):
    return sorted(value) if isinstance(value, list) else value


# HF PEFT's OFT forward on k x k convolutions (k > 1) sums overlapping rotated patches: it differs from
# its own merged weight and even from the base model at the identity initialisation. This engine
# uses the merged form (a rotated kernel), so k x k convs are checked against the merge only.
MERGE_CASES = CASES + [("oft-conv-3x3", "convnet", "OFTConfig", {"target_modules": ["conv2d"], "oft_block_size": 3})]


def test_oft_conv_identity_init_is_the_base_model():
    model = pe.get_peft_model(tiny_convnet(), pe.OFTConfig(target_modules=["conv2d"], oft_block_size=3))
    inputs = model_inputs(tiny_convnet())
    assert_close(run(model, inputs), run(tiny_convnet(), inputs), what="identity OFT on a 3x3 conv")


@pytest.mark.parametrize("case", MERGE_CASES, ids=[c[0] for c in MERGE_CASES])
def test_merge_unmerge_unload(case, hf_folder):
    _, family, cls_name, kwargs = case
    model = _quiet(pe.PeftModel.from_pretrained, BUILD[family](), hf_folder(case)[0])
    inputs = model_inputs(BUILD[family]())
    expected = run(model, inputs)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}

    _quiet(model.base_model.merge_adapter)
    assert_close(run(model, inputs), expected, atol=1e-5, what="merged")
    _quiet(model.base_model.unmerge_adapter)
    assert_close(run(model, inputs), expected, atol=1e-5, what="unmerged")
    for name, param in model.named_parameters():
        if name in base_weights:
            assert_close(param.detach(), base_weights[name], atol=1e-5, what=f"restored {name}")

    plain = _quiet(model.base_model.merge_and_unload)
    assert not any(isinstance(m, AdapterLayer) for m in plain.modules())
    assert_close(run(plain, inputs), expected, atol=1e-5, what="merge_and_unload")


# ---- several adapters ----------------------------------------------------------------------------
TWO = {
    "IA3Config": {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
                  "init_ia3_weights": False},
    "LoHaConfig": {"target_modules": ["q_proj", "v_proj"], "r": 2, "init_weights": False},
    "LoKrConfig": {"target_modules": ["q_proj", "v_proj"], "r": 2, "init_weights": False},
    "OFTConfig": {"target_modules": ["q_proj", "v_proj"], "oft_block_size": 4, "init_weights": False},
    "BOFTConfig": {"target_modules": ["q_proj", "v_proj"], "boft_block_size": 4, "init_weights": False},
    "VeraConfig": {"target_modules": ["q_proj", "v_proj"], "r": 4, "init_weights": False},
}


def _two_adapters(cls_name: str, library):
    kwargs = TWO[cls_name]
    first = getattr(library, cls_name)(**kwargs)
    second = getattr(library, cls_name)(**{**kwargs, "target_modules": ["v_proj"]} if cls_name != "IA3Config"
                                        else {**kwargs, "target_modules": ["v_proj", "down_proj"]})
    model = _quiet(library.get_peft_model, tiny_llama(), first)
    _quiet(model.add_adapter, "other", second)
    return model


@pytest.mark.parametrize("cls_name", sorted(TWO))
def test_two_adapters_match_hf(cls_name):
    hf, ours = _two_adapters(cls_name, peft), _two_adapters(cls_name, pe)
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name in hf_params and ("default" in name or "other" in name):
                param.copy_(hf_params[name])
    ours_names = {n for n, _ in ours.named_parameters() if "default" in n or "other" in n}
    assert ours_names == {n for n in hf_params if "default" in n or "other" in n}
    inputs = model_inputs(tiny_llama())
    for active in (["default"], ["other"], ["default", "other"]):
        hf.base_model.set_adapter(active)
        ours.set_adapter(active)
        assert_close(run(ours, inputs), run(hf, inputs), what=f"{cls_name} active={active}")
    with ours.disable_adapter():
        assert_close(run(ours, inputs), run(tiny_llama(), inputs), what="disabled")
    ours.delete_adapter("other")
    assert ours.active_adapters == ["default"] and "other" not in ours.peft_config
    assert not any(".other" in n for n, _ in ours.named_parameters())


@pytest.mark.parametrize("cls_name", sorted(TWO))
def test_per_example_adapters_in_one_batch(cls_name):
    model = _two_adapters(cls_name, pe)
    inputs = model_inputs(tiny_llama(), batch=3)
    names = ["other", "__base__", "default"]
    mixed = run(model, inputs, adapter_names=names)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                expected = run(model, inputs)
        else:
            model.set_adapter(name)
            expected = run(model, inputs)
        assert_close(mixed[row], expected[row], what=f"{cls_name} row {row} ({name})")


def test_trainable_parameters_and_gradients_match_hf():
    for cls_name, kwargs in TWO.items():
        kwargs = {**kwargs, "target_modules": ["q_proj", "v_proj"]} if cls_name != "IA3Config" else kwargs
        hf = _quiet(peft.get_peft_model, tiny_llama(), getattr(peft, cls_name)(**kwargs))
        ours = _quiet(pe.get_peft_model, tiny_llama(), getattr(pe, cls_name)(**kwargs))
        trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
        assert trainable == {n for n, p in hf.named_parameters() if p.requires_grad}, cls_name
        ids = model_inputs(tiny_llama())["input_ids"]
        ours.train()
        ours(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for n, p in ours.named_parameters() if n in trainable), cls_name
        assert all(p.grad is None for n, p in ours.named_parameters() if n not in trainable), cls_name


@pytest.mark.parametrize("cls_name", ["LoraConfig", "LoHaConfig", "LoKrConfig", "OFTConfig"])
def test_hooks_on_a_base_layer_see_it_run_in_training(cls_name):
    # The fused training paths compute with the base weight instead of calling the base layer:
    # a hook on it must make them call it.
    kwargs = TWO.get(cls_name, {"target_modules": ["q_proj", "v_proj"], "r": 2})
    model = _quiet(pe.get_peft_model, tiny_llama(), getattr(pe, cls_name)(**kwargs))
    base = _layer(model, "layers.1.self_attn.q_proj").base_layer  # its input carries a gradient
    inputs = model_inputs(tiny_llama(), batch=8)  # more tokens than q_proj has outputs: OFT rotates W
    model.train()
    seen: list[str] = []
    handles = [base.register_forward_hook(lambda *args: seen.append("forward")),
               base.register_full_backward_hook(lambda *args: seen.append("backward"))]
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for handle in handles:
        handle.remove()
    assert seen == ["forward", "backward"], cls_name


# ---- factored forwards equal the dense formulas ------------------------------------------------
def _layer(model, name="q_proj"):
    return next(m for n, m in model.named_modules() if n.endswith(name) and isinstance(m, AdapterLayer))


def test_loha_khatri_rao_forward_equals_dense():
    for r in (2, 3, 8):  # r = 8 on a 16-wide layer takes the dense route; the small ranks the factored one
        model = _quiet(pe.get_peft_model, tiny_llama(),
                       pe.LoHaConfig(target_modules=["q_proj", "down_proj"], r=r, init_weights=False))
        for name in ("q_proj", "down_proj"):
            layer = _layer(model, name)
            x = torch.randn(2, 5, layer.in_features)
            factored = layer.linear_delta_output("default", x)
            dense = x @ layer.dense_delta("default").T
            w1a, w1b = layer.hada_w1_a["default"], layer.hada_w1_b["default"]
            w2a, w2b = layer.hada_w2_a["default"], layer.hada_w2_b["default"]
            reference = x @ (((w1a @ w1b) * (w2a @ w2b)) * layer.scaling["default"]).T
            assert_close(factored, reference, what=f"LoHa r={r} {name}")
            assert_close(dense, reference, what=f"LoHa dense r={r}")
            ka, kb = layer.khatri_rao("default")
            assert_close(ka @ kb, (w1a @ w1b) * (w2a @ w2b), what="Khatri-Rao identity")


def test_lokr_kronecker_forward_equals_dense():
    for kwargs in ({"r": 8}, {"r": 1}, {"r": 1, "decompose_both": True, "decompose_factor": 4},
                   {"r": 2, "decompose_factor": 2}):
        model = _quiet(pe.get_peft_model, tiny_llama(),
                       pe.LoKrConfig(target_modules=["q_proj", "down_proj", "k_proj"], init_weights=False, **kwargs))
        for name in ("q_proj", "down_proj", "k_proj"):
            layer = _layer(model, name)
            x = torch.randn(3, 4, layer.in_features)
            kron = torch.kron(layer.w1("default"), layer.w2("default")) * layer.scaling["default"]
            assert_close(layer.linear_delta_output("default", x), x @ kron.T, what=f"LoKr {kwargs} {name}")


def test_oft_and_boft_rotate_the_input_like_the_matrix():
    from peft_engine.tuners.oft.layer import rotate_blocks

    blocks = torch.linalg.qr(torch.randn(4, 3, 3))[0]
    x = torch.randn(2, 5, 12)
    assert_close(rotate_blocks(x, blocks), x @ torch.block_diag(*blocks), what="block rotation")
    assert_close(rotate_blocks(x, blocks[:1]), x @ torch.block_diag(*blocks[:1].expand(4, -1, -1)), what="shared")
    model = _quiet(pe.get_peft_model, tiny_llama(), pe.BOFTConfig(target_modules=["down_proj"], boft_block_size=2,
                                                                  boft_n_butterfly_factor=3, init_weights=False))
    layer = _layer(model, "down_proj")
    x = torch.randn(2, 3, layer.in_features)
    assert_close(layer.rotate("default", x), x @ layer.matrix("default"), what="BOFT butterfly rotation")
    rot = layer.matrix("default")
    assert_close(rot @ rot.T, torch.eye(rot.shape[0]), what="BOFT rotation is orthogonal")


def test_boft_butterfly_factors_match_hf_formula():
    """HF PEFT needs a CUDA extension for more than one butterfly factor; its formula is rebuilt here."""
    model = _quiet(pe.get_peft_model, tiny_llama(), pe.BOFTConfig(target_modules=["down_proj"], boft_block_size=4,
                                                                  boft_n_butterfly_factor=3, init_weights=False))
    layer = _layer(model, "down_proj")
    hf_layer_cls = peft.tuners.boft.layer.BOFTLayer
    width, size, num = layer.in_features, layer.boft_block_size["default"], layer.boft_block_num["default"]
    perms = torch.stack([hf_layer_cls.perm2mat(None, hf_layer_cls.block_butterfly_perm(None, width, num // 2**i,
                                                                                         size // 2, 2))
                         for i in range(3)])
    blocks = hf_layer_cls.cayley_batch(None, layer.boft_R["default"].detach().view(-1, size, size)).view(3, num, size,
                                                                                                      size)
    diag = torch.stack([torch.block_diag(*b) for b in blocks])
    batch = torch.bmm(perms, torch.bmm(diag, perms.permute(0, 2, 1)))
    expected = batch[0]
    for i in range(1, 3):
        expected = batch[i] @ expected
    assert_close(layer.matrix("default").detach(), expected, what="butterfly matrix")


# ---- bitsandbytes bases ----------------------------------------------------------------------------
def _quantized_llama(kind: str) -> nn.Module:
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_llama()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.endswith(("q_proj", "v_proj", "down_proj")):
            if kind == "4bit":
                new = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                        compute_dtype=torch.float32)
            else:
                new = bnb.nn.Linear8bitLt(module.in_features, module.out_features, bias=module.bias is not None,
                                          has_fp16_weights=False)
            new.load_state_dict(module.state_dict())
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, new.to("cpu"))
    setattr(model, f"is_loaded_in_{kind}", True)
    return model


QUANT = [(kind, cls_name, kwargs) for kind in ("4bit", "8bit") for cls_name, kwargs in (
    ("IA3Config", {"target_modules": ["q_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
    ("OFTConfig", {"target_modules": ["q_proj", "v_proj", "down_proj"], "oft_block_size": 4}),
)]


@pytest.mark.parametrize("kind,cls_name,kwargs", QUANT, ids=[f"{q[1]}-{q[0]}" for q in QUANT])
def test_quantized_bases_match_hf_and_merge(kind, cls_name, kwargs, tmp_path):
    hf = _quiet(peft.get_peft_model, _quantized_llama(kind), getattr(peft, cls_name)(**kwargs))
    perturb_adapters(hf, scale=0.1)
    inputs = model_inputs(tiny_llama())
    expected = run(hf, inputs)
    hf.save_pretrained(tmp_path)
    ours = _quiet(pe.PeftModel.from_pretrained, _quantized_llama(kind), tmp_path)
    assert_close(run(ours, inputs), expected, atol=1e-4, what=f"{cls_name} on {kind}")
    # Merging dequantizes, folds the adapter in and quantizes again: equal up to re-quantization error.
    merged = _quiet(ours.base_model.merge_and_unload)
    assert type(merged.model.layers[0].self_attn.q_proj).__name__.startswith("Linear")
    error = (run(merged, inputs) - expected).abs().max().item()
    assert error < 0.05, f"{cls_name} merged on {kind}: max error {error}"


@pytest.mark.parametrize("cls_name", ["LoHaConfig", "LoKrConfig", "BOFTConfig", "VeraConfig", "AdaLoraConfig"])
def test_other_methods_run_on_quantized_bases(cls_name):
    extra = {"total_step": 5, "init_lora_weights": False} if cls_name == "AdaLoraConfig" else TWO[cls_name]
    kwargs = {**extra, "target_modules": ["q_proj", "v_proj"]}
    model = _quiet(pe.get_peft_model, _quantized_llama("8bit"), getattr(pe, cls_name)(**kwargs))
    inputs = model_inputs(tiny_llama())
    before = run(model, inputs)
    _quiet(model.base_model.merge_adapter)
    assert (run(model, inputs) - before).abs().max() < 0.05


# ---- the sweep registry, config errors ------------------------------------------------------------
def test_methods_are_registered_for_sweeps():
    for name, cls_name, size in (("ia3", "IA3Config", None), ("loha", "LoHaConfig", "r"), ("lokr", "LoKrConfig", "r"),
                                 ("oft", "OFTConfig", "oft_block_size"), ("boft", "BOFTConfig", "boft_block_size"),
                                 ("vera", "VeraConfig", "r"), ("adalora", "AdaLoraConfig", "init_r")):
        spec = pe.get_method(name)
        assert spec.config_cls.__name__ == cls_name and spec.size_field == size and spec.quantized_bases
        assert "target_modules" not in spec.hyperparameters()
    assert isinstance(pe.get_method("loha").build_config(r=4), pe.LoHaConfig)


@pytest.mark.parametrize("cls_name,kwargs,field", [
    ("LoHaConfig", {"r": 0}, "r"),
    ("LoHaConfig", {"module_dropout": 1.5}, "module_dropout"),
    ("LoKrConfig", {"init_weights": "kaiming"}, "init_weights"),
    ("LoKrConfig", {"decompose_factor": 0}, "decompose_factor"),
    ("OFTConfig", {"r": 4, "oft_block_size": 4}, "oft_block_size"),
    ("OFTConfig", {"bias": "lora_only"}, "bias"),
    ("BOFTConfig", {"boft_block_size": 0, "boft_block_num": 0}, "boft_block_num"),
    ("BOFTConfig", {"boft_n_butterfly_factor": 0}, "boft_n_butterfly_factor"),
    ("VeraConfig", {"vera_dropout": -0.1}, "vera_dropout"),
    ("IA3Config", {"target_modules": ["k"], "feedforward_modules": ["wo"]}, "feedforward_modules"),
])
def test_bad_config_values_name_the_field(cls_name, kwargs, field):
    with pytest.raises(ValueError, match=field):
        getattr(pe, cls_name)(**kwargs)


def test_layer_errors_are_clear():
    with pytest.raises(ValueError, match="boft_block_size=3 must divide"):
        pe.get_peft_model(tiny_llama(), pe.BOFTConfig(target_modules=["q_proj"], boft_block_size=3))
    with pytest.raises(ValueError, match="feedforward_modules=None"):
        pe.get_peft_model(tiny_convnet(), pe.IA3Config(target_modules=["lin"]))
    with pytest.raises(ValueError, match="projection_prng_key"):
        model = pe.get_peft_model(tiny_llama(), pe.VeraConfig(target_modules=["q_proj"], r=4))
        model.add_adapter("b", pe.VeraConfig(target_modules=["q_proj"], r=4, projection_prng_key=1))


def test_old_oft_files_are_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "OFT", "r": 8, "target_modules": ["q"]}))
    with pytest.raises(ValueError, match="oft_block_size"):
        pe.PeftConfig.from_pretrained(tmp_path)


def test_boft_file_from_hf_without_cuda_extension_loads(tmp_path):
    """HF PEFT trains with one butterfly factor when its extension is missing, whatever the config says."""
    hf = _hf_model("llama", "BOFTConfig", {"target_modules": ["q_proj"], "boft_block_size": 4,
                                           "boft_n_butterfly_factor": 2})
    hf.save_pretrained(tmp_path)
    inputs = model_inputs(tiny_llama())
    with pytest.warns(UserWarning, match="butterfly factor"):
        ours = pe.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_close(run(ours, inputs), run(hf, inputs), what="1-factor file, 2-factor config")


def test_ia3_weighted_adapter_matches_hf():
    models = []
    for library in (peft, pe):
        kwargs = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
                  "init_ia3_weights": False}
        torch.manual_seed(5)
        model = _quiet(library.get_peft_model, tiny_llama(), library.IA3Config(**kwargs))
        _quiet(model.add_adapter, "b", library.IA3Config(**kwargs))
        models.append(model)
    hf, ours = models
    hf_params = dict(hf.named_parameters())
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "ia3_l" in name:
                param.copy_(hf_params[name])
    for model in (hf, ours):
        model.base_model.add_weighted_adapter(["default", "b"], [0.7, 0.4], "mix")
        model.base_model.set_adapter("mix")
    inputs = model_inputs(tiny_llama())
    assert_close(run(ours, inputs), run(hf, inputs), what="weighted IA3 adapter")


@pytest.mark.parametrize("cls_name,kwargs", [
    ("LoHaConfig", {"r": 2, "init_weights": False}),
    ("LoKrConfig", {"r": 2, "init_weights": False}),
    ("OFTConfig", {"oft_block_size": 4, "init_weights": False}),
    ("BOFTConfig", {"boft_block_size": 4, "init_weights": False}),
], ids=["loha", "lokr", "oft", "boft"])
def test_conv1d_layers_beyond_hf(cls_name, kwargs):
    """HF PEFT has no transformers-Conv1D layer for these methods; here the transposed weight is handled."""
    model = _quiet(pe.get_peft_model, tiny_gpt2(), getattr(pe, cls_name)(target_modules=["c_attn", "c_fc"], **kwargs))
    inputs = model_inputs(tiny_gpt2())
    expected = run(model, inputs)
    assert (expected - run(tiny_gpt2(), inputs)).abs().max() > 1e-3
    assert_close(run(_quiet(model.base_model.merge_and_unload), inputs), expected, what=f"{cls_name} on Conv1D")


@pytest.mark.parametrize("cls_name", ["LoHaConfig", "LoKrConfig"])
@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("rank_dropout", [0.0, 0.5])
def test_training_through_the_summed_weight_matches_the_factored_update(cls_name, builder, rank_dropout, tmp_path):
    """LoHa/LoKr train with one GEMM on ``W + delta``: loss and every gradient equal the factored
    ``base(x) + update`` (ours with the summed path switched off) and, on Linear without rank
    dropout (HF PEFT draws its dropout masks in another order), HF PEFT's."""
    import copy

    targets = ["q_proj", "down_proj"] if builder is tiny_llama else ["c_attn", "c_fc"]
    config = getattr(pe, cls_name)(target_modules=targets, r=4, init_weights=False, rank_dropout=rank_dropout)
    ours = _quiet(pe.get_peft_model, builder(), config)
    factored = copy.deepcopy(ours)
    for module in factored.modules():
        if hasattr(module, "_trains_merged"):
            module._trains_merged = lambda: False
    references = [factored]
    if builder is tiny_llama and not rank_dropout:  # HF PEFT has no LoHa/LoKr for Conv1D
        ours.save_pretrained(tmp_path)
        references.append(_quiet(peft.PeftModel.from_pretrained, builder(), tmp_path, is_trainable=True))
    ids = model_inputs(builder())["input_ids"]
    assert any(m._trains_merged() for m in ours.train().modules() if hasattr(m, "_trains_merged"))
    torch.manual_seed(0)
    loss = ours(input_ids=ids, labels=ids).loss
    loss.backward()
    for reference in references:
        torch.manual_seed(0)
        expected = reference.train()(input_ids=ids, labels=ids).loss
        expected.backward()
        assert_close(loss, expected, atol=1e-5, what=f"loss vs {type(reference).__module__}")
        grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        for name, param in ours.named_parameters():
            if param.requires_grad:
                assert_close(param.grad, grads[name], atol=1e-5, what=name)
