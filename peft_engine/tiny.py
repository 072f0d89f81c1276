"""Tiny random base models for tests and smoke runs, identical in every process.

``tiny-random-llama`` has SmolLM2's architecture (Llama, grouped-query attention, tied
embeddings, ChatML template) at a size that trains in milliseconds; ``tiny-random-bert``
is a BERT encoder for sequence-classification and feature-extraction tests.

Nothing comes from the Hub: each tokenizer is trained here with the ``tokenizers`` library
on the English part of the ``chatterbot-corpus`` package, and the weights are drawn from a
``torch.Generator`` seeded per parameter name (not from the global RNG and not from
transformers' init code), so every process on every machine with the same package
versions gets the same bytes, and the caller's RNG state is left untouched. The result is
written once into the model cache (see :mod:`peft_engine.cache`) like a converted base.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import zlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import cache

if TYPE_CHECKING:
    import torch

TINY_SEED = 20240601
# Bump when the recipe below changes, so caches built by an older recipe are not reused.
TINY_RECIPE_VERSION = 1

# SmolLM2-135M-Instruct's chat template (read from its GGUF), so prompts built for the tiny
# model have exactly the real model's shape.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)

LLAMA_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

TINY_RECIPES: dict[str, dict[str, Any]] = {
    "tiny-random-llama": {
        "vocab_size": 2048,
        "config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
        },
    },
    "tiny-random-bert": {
        "vocab_size": 1024,
        "config": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 512,
            "type_vocab_size": 2,
        },
    },
}
TINY_NAMES = tuple(TINY_RECIPES)


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (some import optional deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_files() -> list[Path]:
    """The English chatterbot-corpus YAML files, in a fixed (sorted) order."""
    data = _package_dir("chatterbot_corpus", "chatterbot-corpus==1.3.3") / "data" / "english"
    files = sorted(data.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no *.yml files in {data}; is chatterbot-corpus installed completely?")
    return files


def corpus_texts() -> list[str]:
    """Every utterance of the English corpus, in file then document order."""
    import yaml

    texts: list[str] = []
    for path in corpus_files():
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
        for conv in doc.get("conversations") or []:
            items = conv if isinstance(conv, list) else [conv]
            texts.extend(str(t) for t in items if t is not None)
    return texts


def corpus_digest() -> str:
    h = hashlib.sha256()
    for path in corpus_files():
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE like SmolLM2's, with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=LLAMA_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        model_max_length=TINY_RECIPES["tiny-random-llama"]["config"]["max_position_embeddings"],
        padding_side="right",
    )
    fast.chat_template = SMOLLM2_CHAT_TEMPLATE
    return fast


def train_wordpiece_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Lower-cased WordPiece like BERT's, adding [CLS] ... [SEP] around every input.

    The vocabulary is chosen here rather than by ``tokenizers.trainers.WordPieceTrainer``,
    whose result varies between processes (it breaks ties between equally frequent merges by
    ids it assigns in hash-map order). It is built from the same normaliser and
    pre-tokeniser BERT uses: every character and its ``##`` continuation (so any word can be
    spelled), then the most frequent whole words, ties broken alphabetically.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    vocab = BERT_SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]
    taken = set(vocab)
    words = sorted((w for w in counts if len(w) > 1 and w not in taken), key=lambda w: (-counts[w], w))
    vocab += words[: max(0, vocab_size - len(vocab))]

    tok = Tokenizer(
        models.WordPiece(vocab={t: i for i, t in enumerate(vocab)}, unk_token="[UNK]", continuing_subword_prefix="##")
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(BERT_SPECIAL_TOKENS)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=TINY_RECIPES["tiny-random-bert"]["config"]["max_position_embeddings"],
        padding_side="right",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def _seeded_init_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from a generator seeded by (seed, parameter name).

    Independent of module construction order and of transformers' own init code, so the
    weights only change when names or shapes do. Matrices ~ N(0, 0.02); 1-D weights (norm
    scales) = 1 and biases = 0, which keeps activations well scaled like a trained model's.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                gen = torch.Generator().manual_seed(seed ^ zlib.crc32(name.encode()))
                values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
                param.copy_(values.to(param.dtype))
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def build_tiny(name: str, out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Train the tokenizer and write model + tokenizer for ``name`` into ``out_dir``."""
    if name not in TINY_RECIPES:
        raise ValueError(f"unknown tiny model {name!r}; allowed: {', '.join(TINY_NAMES)}")
    recipe = TINY_RECIPES[name]
    texts = corpus_texts()
    out = Path(out_dir)
    if name == "tiny-random-llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        tok = train_bpe_tokenizer(texts, recipe["vocab_size"])
        config = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **recipe["config"],
        )
        model_cls = LlamaForCausalLM
    else:
        from transformers import BertConfig, BertModel

        tok = train_wordpiece_tokenizer(texts, recipe["vocab_size"])
        config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, **recipe["config"])
        model_cls = BertModel
    import torch

    # Construction draws from the global RNG; fork it so the caller's stream is unchanged.
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config)
    _seeded_init_(model, TINY_SEED)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return {"kind": "tiny", "spec": name, "vocab_size": len(tok), "seed": TINY_SEED}


def tiny_cache_key(name: str) -> str:
    """Content key: recipe, seed, corpus bytes and the library versions that shape the files."""
    import tokenizers
    import transformers

    payload = json.dumps(
        {
            "name": name,
            "recipe": TINY_RECIPES[name],
            "recipe_version": TINY_RECIPE_VERSION,
            "seed": TINY_SEED,
            "corpus": corpus_digest(),
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__.split(".")[0],
        },
        sort_keys=True,
    )
    return f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def tiny_model_dir(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder of the cached tiny model ``name``, building it on first use on this machine."""
    if name not in TINY_RECIPES:
        raise ValueError(f"unknown tiny model {name!r}; allowed: {', '.join(TINY_NAMES)}")
    return cache.get_or_create(
        tiny_cache_key(name), lambda tmp: build_tiny(name, tmp), cache_dir=cache_dir, meta={"source": name}
    )
