"""LoKr: low-rank Kronecker-product updates (LyCORIS)."""

from .config import LoKrConfig
from .layer import LoKrLayer, factorization
from .model import LoKrModel

__all__ = ["LoKrConfig", "LoKrLayer", "LoKrModel", "factorization"]
