"""VeRA: per-layer scaling vectors around shared frozen random projections."""

from .config import VeraConfig
from .layer import VeraLayer
from .model import VeraModel

__all__ = ["VeraConfig", "VeraLayer", "VeraModel"]
