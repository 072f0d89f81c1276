"""BOFT: orthogonal fine-tuning with butterfly-factorised rotations."""

from ..._lazy import lazy_exports

__all__ = [
    "BOFTConfig",
    "BOFTLayer",
    "BOFTModel",
    "butterfly_perm",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "BOFTConfig": ".config",
        "BOFTLayer": ".layer",
        "BOFTModel": ".model",
        "butterfly_perm": ".layer",
    },
)
