"""(IA)³: learned rescaling vectors on attention outputs and feed-forward inputs."""

from ..._lazy import lazy_exports

__all__ = [
    "IA3Config",
    "IA3Layer",
    "IA3Model",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "IA3Config": ".config",
        "IA3Layer": ".layer",
        "IA3Model": ".model",
    },
)
