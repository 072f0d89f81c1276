"""LoHa: low-rank Hadamard-product updates (FedPara / LyCORIS)."""

from ..._lazy import lazy_exports

__all__ = [
    "LoHaConfig",
    "LoHaLayer",
    "LoHaModel",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LoHaConfig": ".config",
        "LoHaLayer": ".layer",
        "LoHaModel": ".model",
    },
)
