"""AdaLoRA: SVD-form LoRA whose rank budget is re-allocated by importance during training."""

from ..._lazy import lazy_exports

__all__ = [
    "AdaLoraConfig",
    "AdaLoraLayer",
    "AdaLoraModel",
    "RankAllocator",
]
__getattr__, __dir__ = lazy_exports(
    __name__,
    {
        "AdaLoraConfig": ".config",
        "AdaLoraLayer": ".layer",
        "AdaLoraModel": ".model",
        "RankAllocator": ".allocator",
    },
)
