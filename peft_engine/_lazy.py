"""Package attributes imported on first use (PEP 562 module ``__getattr__``).

Configs, method names and target presets are plain Python; layers and models need torch and
transformers (seconds to import). A sweep validates its search space before any Ray resource
starts, and its Ray actors that only relay trials (the trial function, the job board, Ray
Train's controller) unpickle that space: with lazy package attributes none of them imports
torch for it, while ``from peft_engine import LoraConfig, get_peft_model`` works as before.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``: ``exports`` maps a public name to the
    submodule (relative, e.g. ``".model"``) that defines it; other names load as submodules."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif not name.startswith("__") and importlib.util.find_spec(f"{package}.{name}") is not None:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
