"""LoRA and its variants (DoRA, rsLoRA, PiSSA / OLoRA / LoftQ initialisation)."""

from .config import LoftQConfig, LoraConfig
from .layer import Conv, Embedding, Linear, LoraLayer
from .model import LoraModel

__all__ = ["Conv", "Embedding", "Linear", "LoftQConfig", "LoraConfig", "LoraLayer", "LoraModel"]
