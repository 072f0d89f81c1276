"""Regression cases for (IA)³, LoHa, LoKr, OFT, BOFT, VeRA and AdaLoRA (see cases.py for the format).

One or two cases per method and layer kind: Linear (llama), transformers Conv1D (gpt2) and
Conv1d / Conv2d (the conv net), each with the merged output recorded too.
"""

from __future__ import annotations

import peft_engine as pe
from tests.regression.cases import Case

_ATTN_MLP = ["q_proj", "v_proj", "down_proj"]

CASES: dict[str, Case] = {
    "ia3-llama": Case("llama", lambda: pe.IA3Config(), merge=True),
    "ia3-gpt2-conv1d": Case("gpt2", lambda: pe.IA3Config(), merge=True),
    "ia3-conv": Case("convnet", lambda: pe.IA3Config(target_modules=["conv2d", "lin"], feedforward_modules=["conv2d"]),
                     merge=True),
    "loha-llama": Case("llama", lambda: pe.LoHaConfig(target_modules=_ATTN_MLP, r=4, alpha=8,
                                                      rank_pattern={"v_proj": 2}), merge=True),
    "loha-conv-cp": Case("convnet", lambda: pe.LoHaConfig(target_modules=["conv1d", "conv2d", "lin"], r=2,
                                                          use_effective_conv2d=True), merge=True),
    "lokr-llama": Case("llama", lambda: pe.LoKrConfig(target_modules=_ATTN_MLP, r=2, decompose_both=True,
                                                      decompose_factor=4), merge=True),
    "lokr-conv": Case("convnet", lambda: pe.LoKrConfig(target_modules=["conv1d", "conv2d", "lin"], r=2), merge=True),
    "oft-llama": Case("llama", lambda: pe.OFTConfig(target_modules=[*_ATTN_MLP, "embed_tokens"], oft_block_size=4),
                      merge=True),
    "oft-conv-exact-cayley": Case("convnet", lambda: pe.OFTConfig(target_modules=["conv2d"], r=3,
                                                                  oft_block_size=0, use_cayley_neumann=False),
                                  merge=True),
    "boft-llama": Case("llama", lambda: pe.BOFTConfig(target_modules=_ATTN_MLP, boft_block_size=4), merge=True),
    "boft-butterfly": Case("llama", lambda: pe.BOFTConfig(target_modules=["down_proj"], boft_block_size=2,
                                                          boft_n_butterfly_factor=3), merge=True),
    "vera-llama": Case("llama", lambda: pe.VeraConfig(target_modules=_ATTN_MLP, r=8), merge=True),
    "vera-gpt2-conv1d": Case("gpt2", lambda: pe.VeraConfig(target_modules=["c_attn", "c_fc"], r=8,
                                                           projection_prng_key=3), merge=True),
    "adalora-llama": Case("llama", lambda: pe.AdaLoraConfig(target_modules=_ATTN_MLP, init_r=4, total_step=10),
                          merge=True),
    "adalora-conv": Case("convnet", lambda: pe.AdaLoraConfig(target_modules=["conv2d", "lin"], init_r=3,
                                                             total_step=10), merge=True),
}
