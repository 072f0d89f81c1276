"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations of the layer input."""

from .config import OFTConfig
from .layer import OFTLayer, OFTRotation
from .model import OFTModel

__all__ = ["OFTConfig", "OFTLayer", "OFTModel", "OFTRotation"]
