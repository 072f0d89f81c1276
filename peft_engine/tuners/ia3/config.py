"""(IA)³'s config: HF PEFT's ``IA3Config`` fields and defaults.

(IA)³ learns one vector per wrapped layer that rescales either the layer's output
(attention projections) or its input (``feedforward_modules``). Default targets per
architecture are HF PEFT's own, so ``target_modules=None`` picks the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...config import PeftConfig, PeftType, check_bool, normalise_targets, register_config

# HF PEFT's defaults for target_modules / feedforward_modules=None (a subset of its table).
IA3_TARGETS: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"], "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
IA3_FEEDFORWARD: dict[str, list[str]] = {
    "t5": ["wo"], "mt5": [], "gpt2": ["mlp.c_proj"], "bloom": ["mlp.dense_4h_to_h"], "roberta": ["output.dense"],
    "opt": ["fc2"], "gptj": ["fc_out"], "gpt_neox": ["dense_4h_to_h"], "gpt_neo": ["c_proj"], "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"], "llama": ["down_proj"], "mistral": ["down_proj"], "mixtral": ["w2"],
    "bert": ["output.dense"], "deberta-v2": ["output.dense"], "falcon": ["dense_4h_to_h"], "phi": ["fc2"],
    "gemma": ["down_proj"], "gemma2": ["down_proj"], "qwen2": ["down_proj"], "qwen3": ["down_proj"],
}


@register_config
@dataclass
class IA3Config(PeftConfig):
    """``y = l ⊙ (W x)`` for attention layers, ``y = W (l ⊙ x)`` for feed-forward layers; ``l`` starts at 1."""

    PEFT_TYPE = PeftType.IA3

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "fan_in_fan_out", "init_ia3_weights", "inference_mode")
        normalise_targets(self)
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"feedforward_modules={self.feedforward_modules!r} is not allowed: {extra} not in "
                    f"target_modules={self.target_modules!r}; allowed: a subset of target_modules"
                )
