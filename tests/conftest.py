"""Shared fixtures: tiny, randomly initialised models built from configs (never downloaded).

Every builder seeds torch itself, so two calls give bit-identical models: one copy goes to
peft_engine and one to HF PEFT (or to the untouched reference), and the outputs must agree.
The builders are plain functions (``tiny_llama()`` ...) so other test files and the
regression suite can import them; the ``make_model`` fixture gives them by name.

``--regen-references`` (see :mod:`tests.regression`) rewrites the regression references.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

VOCAB = 64
SEQ = 6

# Tiny models: thread start-up costs more than it saves, and one thread keeps sums in one order.
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--regen-references",
        action="store_true",
        default=False,
        help="rewrite tests/regression/references/*.safetensors (refused on a dirty git tree)",
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Same seed before every test: tiny models are cheap, determinism is not optional."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_bnb_4bit_path_on_every_cpu():
    """bitsandbytes' 4-bit layers take the same path on every CPU here.

    On CPUs with AVX512-BF16 a ``Linear4bit``'s first no-grad eval forward repacks its weight into a
    CPU-only layout: absmax rounded to bf16 (outputs move by ~1e-3), an assertion failure for layers
    whose output width is not a multiple of 32 (every tiny model here), and bytes HF PEFT's
    dequantize reads as garbage. The tests switch that off for the layers they build, so a result
    does not depend on which CPU ran it; ``test_dequantize_reads_the_cpu_packed_4bit_layout`` packs
    a weight explicitly to check that our own dequantize reads that layout.
    """
    try:
        import bitsandbytes.nn.modules as bnb_modules
    except ImportError:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
        yield


# ---- tiny transformers models ---------------------------------------------------------------
def _build(config_cls_name: str, model_cls_name: str, seed: int, **kwargs) -> nn.Module:
    import transformers

    config = getattr(transformers, config_cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config)
    return model.eval()


_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    return _build("LlamaConfig", "LlamaForCausalLM", seed, **{**_LLAMA_LIKE, **overrides})


def tiny_mistral(seed: int = 0) -> nn.Module:
    return _build("MistralConfig", "MistralForCausalLM", seed, **_LLAMA_LIKE)


def tiny_qwen2(seed: int = 0) -> nn.Module:
    return _build("Qwen2Config", "Qwen2ForCausalLM", seed, **_LLAMA_LIKE)


def tiny_gemma(seed: int = 0) -> nn.Module:
    return _build("GemmaConfig", "GemmaForCausalLM", seed, **_LLAMA_LIKE, head_dim=8)


def tiny_gpt2(seed: int = 0) -> nn.Module:
    return _build("GPT2Config", "GPT2LMHeadModel", seed, vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2,
                  n_positions=32, bos_token_id=1, eos_token_id=1)


def tiny_gpt_neox(seed: int = 0) -> nn.Module:
    return _build("GPTNeoXConfig", "GPTNeoXForCausalLM", seed, vocab_size=VOCAB, hidden_size=16,
                  intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)


def tiny_opt(seed: int = 0) -> nn.Module:
    return _build("OPTConfig", "OPTForCausalLM", seed, vocab_size=VOCAB, hidden_size=16, ffn_dim=32,
                  num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16)


_BERT_LIKE = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, max_position_embeddings=32)


def tiny_bert(seed: int = 0, head: str = "BertForSequenceClassification", **overrides) -> nn.Module:
    """``head``: any transformers Bert* class (QuestionAnswering gets its 2 labels: start, end)."""
    kwargs = {**_BERT_LIKE, "num_labels": 2 if head.endswith("QuestionAnswering") else 3, **overrides}
    return _build("BertConfig", head, seed, **kwargs)


def tiny_roberta(seed: int = 0) -> nn.Module:
    return _build("RobertaConfig", "RobertaForSequenceClassification", seed, **_BERT_LIKE, num_labels=3,
                  pad_token_id=1)


def tiny_t5(seed: int = 0) -> nn.Module:
    return _build("T5Config", "T5ForConditionalGeneration", seed, vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=8,
                  num_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0)


def tiny_bart(seed: int = 0) -> nn.Module:
    return _build("BartConfig", "BartForConditionalGeneration", seed, vocab_size=VOCAB, d_model=16,
                  encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                  encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)


class TinyConvNet(nn.Module):
    """Conv1d, Conv2d, Embedding and Linear in one small module (no transformers config)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.lin = nn.Linear(8 * 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)  # (B, T, 8)
        h = self.conv1d(h.transpose(1, 2)).relu()  # (B, 8, T)
        h = self.conv2d(h.unsqueeze(1)).relu()  # (B, 4, 8, T)
        h = h.mean(-1).flatten(1)  # (B, 32)
        return self.head(self.lin(h).relu())


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "mistral": tiny_mistral,
    "qwen2": tiny_qwen2,
    "gemma": tiny_gemma,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox,
    "opt": tiny_opt,
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "t5": tiny_t5,
    "bart": tiny_bart,
    "convnet": tiny_convnet,
}


def input_ids(batch: int = 2, seq: int = SEQ, seed: int = 1, low: int = 2) -> torch.Tensor:
    """Fixed token ids (ids 0/1 avoided: pad tokens of some tiny configs)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, VOCAB, (batch, seq), generator=gen)


def model_inputs(model: nn.Module, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    """Keyword inputs for a forward pass of any builder's model."""
    ids = input_ids(batch, seed=seed)
    if isinstance(model, TinyConvNet) or isinstance(getattr(model, "model", None), TinyConvNet):
        return {"input_ids": ids}
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = input_ids(batch, seq=4, seed=seed + 1)
    return kwargs


def output_tensor(out) -> torch.Tensor:
    """The main output tensor of a forward (logits, start logits, last hidden state, or a plain tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "start_logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


@torch.no_grad()
def run(model: nn.Module, inputs: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    """Eval-mode forward (dropout off); leaves the model in eval mode."""
    model.eval()
    return output_tensor(model(**inputs, **extra)).detach().clone()


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """``make_model("llama")`` -> a fresh tiny model; same name and seed -> identical weights."""

    def factory(name: str, seed: int = 0, **kwargs) -> nn.Module:
        return BUILDERS[name](seed=seed, **kwargs)

    return factory


# ---- helpers for comparing against HF PEFT (the test-only reference) ---------------------------
# Parameter-name parts of randomly initialised adapter factors (other methods may append theirs).
FACTOR_KEYS = ["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"]


def output_and_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One backward of a fixed non-uniform output gradient: the output and every trainable tensor's
    gradient (``"x"``: the input's), to compare two implementations of one layer."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["x"] = x.grad
    return out.detach(), grads


@torch.no_grad()
def perturb_adapters(model: nn.Module, seed: int = 123, scale: float = 0.3) -> None:
    """Give every trainable tensor fixed random values, so adapters are far from their (often no-op) init.

    Values are drawn in sorted-name order from a private generator, so two models with the same
    trainable names get the same values whatever library built them. Low-rank factors (whose
    random init differs between libraries) are replaced; everything else (DoRA magnitudes,
    biases, modules_to_save copies: deterministic functions of the base) gets noise added.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if param.requires_grad:
            noise = scale * torch.randn(param.shape, generator=gen, dtype=torch.float32)
            replace = any(f".{key}" in name for key in FACTOR_KEYS)
            param.copy_((noise if replace else param.float() + noise).to(param.dtype))


def trainable_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def hf_config(ours_config):
    """The HF PEFT config with the same fields as one of ours (same class name, same values)."""
    import dataclasses

    import peft

    cls = getattr(peft, type(ours_config).__name__)
    hf_fields = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {f.name: getattr(ours_config, f.name) for f in dataclasses.fields(ours_config)
              if f.init and f.name in hf_fields and f.name != "peft_type"}
    return cls(**values)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, what: str = "") -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")
