"""LoKr: low-rank Kronecker-product updates (LyCORIS)."""

from ..._lazy import lazy_exports

__all__ = [
    "LoKrConfig",
    "LoKrLayer",
    "LoKrModel",
    "factorization",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "LoKrConfig": ".config",
        "LoKrLayer": ".layer",
        "LoKrModel": ".model",
        "factorization": ".layer",
    },
)
