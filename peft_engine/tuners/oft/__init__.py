"""OFT: orthogonal fine-tuning with block-diagonal Cayley rotations of the layer input."""

from ..._lazy import lazy_exports

__all__ = [
    "OFTConfig",
    "OFTLayer",
    "OFTModel",
    "OFTRotation",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "OFTConfig": ".config",
        "OFTLayer": ".layer",
        "OFTModel": ".model",
        "OFTRotation": ".layer",
    },
)
