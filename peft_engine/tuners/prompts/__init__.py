"""Prompt-learning methods (prompt tuning, prefix tuning, P-tuning, multitask prompt tuning) and
adaption prompts: configs, encoders and the tuners PeftModel drives."""

from .adaption_prompt import AdaptedAttention, AdaptionPromptModel
from .config import (
    AdaptionPromptConfig,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
)
from .multitask import MultitaskPromptEmbedding
from .p_tuning import PromptEncoder
from .prefix import PrefixEncoder
from .prompt_tuning import PromptEmbedding
from .tuner import PromptLearningModel

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
