"""Method names as the sweeps use them, mapped to engine configs.

A sweep's ``method:`` axis names one entry here; its hyperparameters are the config
dataclass's fields (minus the ones the platform sets itself), so a method's search space is
validated by the same code that validates the config. New methods register with
:func:`register_method` as they land.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .config import PeftConfig
from .tuners.lora.config import LoraConfig
from .tuners.prompts.config import (
    AdaptionPromptConfig,
    MultitaskPromptTuningConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
)

# Set by the platform (targets, task, inference) — never a sweep hyperparameter.
PLATFORM_FIELDS = frozenset(
    {"task_type", "base_model_name_or_path", "revision", "inference_mode", "peft_type", "target_modules", "modules_to_save"}
)


@dataclass(frozen=True)
class MethodSpec:
    """A sweepable method: its config class, fields it fixes, and what it supports."""

    name: str
    config_cls: type[PeftConfig]
    fixed: dict[str, Any] = field(default_factory=dict)
    size_field: str | None = "r"  # the "rank" axis reported in summaries and plots
    uses_targets: bool = True  # prompt-learning methods do not wrap modules
    quantized_bases: bool = True  # can wrap bitsandbytes layers

    def hyperparameters(self) -> dict[str, dataclasses.Field]:
        return {
            f.name: f
            for f in dataclasses.fields(self.config_cls)
            if f.init and f.name not in PLATFORM_FIELDS and f.name not in self.fixed
        }

    def build_config(self, platform: dict[str, Any] | None = None, **hyperparameters: Any) -> PeftConfig:
        """The config for these hyperparameters; ``platform`` sets fields such as target_modules."""
        unknown = set(hyperparameters) - set(self.hyperparameters())
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no hyperparameter {', '.join(sorted(unknown))}; "
                f"allowed: {', '.join(sorted(self.hyperparameters()))}"
            )
        platform = {k: v for k, v in (platform or {}).items() if k != "target_modules" or self.uses_targets}
        return self.config_cls(**{**hyperparameters, **platform, **self.fixed})


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not known; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register_method(MethodSpec("lora", LoraConfig))
register_method(MethodSpec("dora", LoraConfig, fixed={"use_dora": True}))

# Prompt learning: shapes come from the base model (fixed to None = "read from the model"), the
# size axis is the number of virtual tokens, and no module is targeted.
_MODEL_SHAPES = {"token_dim": None, "num_layers": None, "num_attention_heads": None, "num_transformer_submodules": None}
for _name, _cls in (("prompt_tuning", PromptTuningConfig), ("prefix_tuning", PrefixTuningConfig),
                    ("p_tuning", PromptEncoderConfig), ("multitask_prompt_tuning", MultitaskPromptTuningConfig)):
    register_method(MethodSpec(_name, _cls, fixed=dict(_MODEL_SHAPES), size_field="num_virtual_tokens", uses_targets=False))
register_method(MethodSpec("adaption_prompt", AdaptionPromptConfig, fixed={"target_modules": None},
                           size_field="adapter_len", uses_targets=False))

# Other weight-adapting methods (HF PEFT's configs). size_field is the "rank" axis of summaries:
# the width knob of each method, or None where there is none ((IA)³ learns one vector per layer).
from .tuners.adalora.config import AdaLoraConfig  # noqa: E402
from .tuners.boft.config import BOFTConfig  # noqa: E402
from .tuners.ia3.config import IA3Config  # noqa: E402
from .tuners.loha.config import LoHaConfig  # noqa: E402
from .tuners.lokr.config import LoKrConfig  # noqa: E402
from .tuners.oft.config import OFTConfig  # noqa: E402
from .tuners.vera.config import VeraConfig  # noqa: E402

register_method(MethodSpec("ia3", IA3Config, size_field=None))
register_method(MethodSpec("loha", LoHaConfig, size_field="r"))
register_method(MethodSpec("lokr", LoKrConfig, size_field="r"))
register_method(MethodSpec("oft", OFTConfig, size_field="oft_block_size"))
register_method(MethodSpec("boft", BOFTConfig, size_field="boft_block_size"))
register_method(MethodSpec("vera", VeraConfig, size_field="r"))
register_method(MethodSpec("adalora", AdaLoraConfig, size_field="init_r"))
