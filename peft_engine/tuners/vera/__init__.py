"""VeRA: per-layer scaling vectors around shared frozen random projections."""

from ..._lazy import lazy_exports

__all__ = [
    "VeraConfig",
    "VeraLayer",
    "VeraModel",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "VeraConfig": ".config",
        "VeraLayer": ".layer",
        "VeraModel": ".model",
    },
)
