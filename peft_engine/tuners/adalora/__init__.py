"""AdaLoRA: SVD-form LoRA whose rank budget is re-allocated by importance during training."""

from .allocator import RankAllocator
from .config import AdaLoraConfig
from .layer import AdaLoraLayer
from .model import AdaLoraModel

__all__ = ["AdaLoraConfig", "AdaLoraLayer", "AdaLoraModel", "RankAllocator"]
