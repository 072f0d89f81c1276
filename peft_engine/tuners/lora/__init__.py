"""LoRA and its variants (DoRA, rsLoRA, PiSSA / OLoRA / LoftQ initialisation)."""

from ..._lazy import lazy_exports

__all__ = [
    "Conv",
    "Embedding",
    "Linear",
    "LoftQConfig",
    "LoraConfig",
    "LoraLayer",
    "LoraModel",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "Conv": ".layer",
        "Embedding": ".layer",
        "Linear": ".layer",
        "LoftQConfig": ".config",
        "LoraConfig": ".config",
        "LoraLayer": ".layer",
        "LoraModel": ".model",
    },
)
