"""Prompt-learning methods (prompt tuning, prefix tuning, P-tuning, multitask prompt tuning) and
adaption prompts: configs, encoders and the tuners PeftModel drives."""

from ..._lazy import lazy_exports

__all__ = [
    "AdaptedAttention",
    "AdaptionPromptConfig",
    "AdaptionPromptModel",
    "MultitaskPromptEmbedding",
    "MultitaskPromptTuningConfig",
    "MultitaskPromptTuningInit",
    "PrefixEncoder",
    "PrefixTuningConfig",
    "PromptEmbedding",
    "PromptEncoder",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "PromptLearningModel",
    "PromptTuningConfig",
    "PromptTuningInit",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AdaptedAttention": ".adaption_prompt",
        "AdaptionPromptConfig": ".config",
        "AdaptionPromptModel": ".adaption_prompt",
        "MultitaskPromptEmbedding": ".multitask",
        "MultitaskPromptTuningConfig": ".config",
        "MultitaskPromptTuningInit": ".config",
        "PrefixEncoder": ".prefix",
        "PrefixTuningConfig": ".config",
        "PromptEmbedding": ".prompt_tuning",
        "PromptEncoder": ".p_tuning",
        "PromptEncoderConfig": ".config",
        "PromptEncoderReparameterizationType": ".config",
        "PromptLearningConfig": ".config",
        "PromptLearningModel": ".tuner",
        "PromptTuningConfig": ".config",
        "PromptTuningInit": ".config",
    },
)
