"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations."""

from .config import BOFTConfig
from .layer import BOFTLayer, butterfly_perm
from .model import BOFTModel

__all__ = ["BOFTConfig", "BOFTLayer", "BOFTModel", "butterfly_perm"]
