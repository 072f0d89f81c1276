"""Adapter configs: dataclasses that read and write HF PEFT's ``adapter_config.json``.

Every method's config is a dataclass subclass of :class:`PeftConfig`, registered under its
``peft_type`` so that :meth:`PeftConfig.from_pretrained` can build the right class from a
file written by this engine or by HF PEFT. Unknown keys (written by a newer HF PEFT) warn
instead of failing, because refusing a file over an unused field would strand adapters.
Keys we know but whose feature we do not implement are accepted only at their neutral
value: silently ignoring a feature that changes the outputs would be worse than an error.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# HF PEFT writes its version into every config; readers use it to pick compatibility paths.
PEFT_FORMAT_VERSION = "0.21.2"


class PeftType(str, enum.Enum):
    LORA = "LORA"
    ADALORA = "ADALORA"
    IA3 = "IA3"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    BOFT = "BOFT"
    VERA = "VERA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    P_TUNING = "P_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"


class TaskType(str, enum.Enum):
    CAUSAL_LM = "CAUSAL_LM"
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class AnyValue:
    """Marks an unsupported HF field whose value does not change the outputs (accepted as is).

    ``any_value(default)`` also records HF PEFT's default, which :meth:`PeftConfig.to_dict`
    writes so that our ``adapter_config.json`` has the same fields as HF PEFT's.
    """

    _UNSET = object()

    def __init__(self, default: Any = _UNSET) -> None:
        self.default = default

    @property
    def has_default(self) -> bool:
        return self.default is not AnyValue._UNSET


ANY_VALUE = AnyValue()


def any_value(default: Any) -> AnyValue:
    return AnyValue(default)


_CONFIG_REGISTRY: dict[str, type[PeftConfig]] = {}


def register_config(cls: type[PeftConfig]) -> type[PeftConfig]:
    """Class decorator: make ``cls`` loadable from a file whose peft_type is ``cls.PEFT_TYPE``."""
    _CONFIG_REGISTRY[cls.PEFT_TYPE.value] = cls
    return cls


def check_choice(name: str, value: Any, allowed: tuple | list) -> None:
    """Raise a ValueError that names the field, the value and what is allowed."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {', '.join(map(repr, allowed))}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if integer else "a number"
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}={value!r} is not allowed; allowed: {what} {bound}")


def pattern_value(pattern: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """HF PEFT's rule: the first key whose regex matches the end of the module name wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def check_float(name: str, value: Any, low: float, high: float, *, high_open: bool = True) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value
    ok = ok and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is not allowed; allowed: a number in [{low}, {high}{bracket}")


def check_bool(config: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name}={getattr(config, name)!r} is not allowed; allowed: true, false")


def normalise_targets(config: Any) -> None:
    """Sets and tuples become sorted lists (what HF PEFT writes to JSON); strings stay regexes."""
    for name in ("target_modules", "exclude_modules", "feedforward_modules"):
        value = getattr(config, name, None)
        if isinstance(value, (set, tuple)):
            setattr(config, name, sorted(value))
    if isinstance(getattr(config, "modules_to_save", None), str):
        config.modules_to_save = [config.modules_to_save]
    if getattr(config, "layers_pattern", None) is not None and getattr(config, "layers_to_transform", None) is None:
        raise ValueError("layers_pattern is only used with layers_to_transform; set layers_to_transform too")


def check_rank_alpha_patterns(config: Any) -> None:
    """``rank_pattern`` / ``alpha_pattern``: mappings of module-name regex to a positive rank
    (an integer) or alpha, as :func:`pattern_value` reads them."""
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = getattr(config, name)
        if not isinstance(pattern, dict):
            raise ValueError(f"{name}={pattern!r} is not allowed; allowed: a mapping of module pattern -> value")
        for key, value in pattern.items():
            check_positive(f"{name}[{key!r}]", value, integer=name == "rank_pattern")


@dataclass
class PeftConfig:
    """Fields shared by every method, as HF PEFT names them."""

    PEFT_TYPE: ClassVar[PeftType]
    # Fields HF PEFT defines that this engine does not implement: name -> neutral value.
    UNSUPPORTED_FIELDS: ClassVar[dict[str, Any]] = {}

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    peft_type: str | None = field(default=None)

    def __post_init__(self) -> None:
        self.peft_type = self.PEFT_TYPE.value
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None:
            check_choice("task_type", self.task_type, [t.value for t in TaskType])

    @property
    def is_prompt_learning(self) -> bool:
        return False

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        for key, neutral in self.UNSUPPORTED_FIELDS.items():
            if key in out:
                continue
            if not isinstance(neutral, AnyValue):
                out[key] = _jsonable(neutral)
            elif neutral.has_default:
                out[key] = _jsonable(neutral.default)
        out.setdefault("auto_mapping", None)  # HF PEFT always writes it (a dict for task_type=None)
        out["peft_version"] = PEFT_FORMAT_VERSION
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, auto_mapping_dict: dict[str, str] | None = None) -> None:
        """Write ``adapter_config.json``; ``auto_mapping_dict`` names the base class, as HF PEFT records it."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        data = self.to_dict()
        if auto_mapping_dict is not None:
            data["auto_mapping"] = auto_mapping_dict
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        """Build the config class named by ``data['peft_type']`` (or ``cls`` itself)."""
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target_cls = cls
        if cls is PeftConfig or getattr(cls, "PEFT_TYPE", None) is None:
            from . import methods  # noqa: F401  (imports every built-in config class, which registers itself)

            if peft_type is None:
                raise ValueError("adapter config has no 'peft_type'; allowed: " + ", ".join(_CONFIG_REGISTRY))
            if peft_type not in _CONFIG_REGISTRY:
                raise ValueError(
                    f"peft_type={peft_type!r} is not supported; allowed: {', '.join(sorted(_CONFIG_REGISTRY))}"
                )
            target_cls = _CONFIG_REGISTRY[peft_type]
        elif peft_type is not None and peft_type != cls.PEFT_TYPE.value:
            raise ValueError(f"peft_type={peft_type!r} does not match {cls.__name__} ({cls.PEFT_TYPE.value})")
        return target_cls._from_known_keys(data)

    @classmethod
    def _from_known_keys(cls, data: dict[str, Any]) -> PeftConfig:
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs, unknown = {}, []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in cls.UNSUPPORTED_FIELDS:
                neutral = cls.UNSUPPORTED_FIELDS[key]
                if not isinstance(neutral, AnyValue) and value != neutral and not (value in (None, {}, [], False) and neutral in (None, {}, [], False)):
                    raise NotImplementedError(
                        f"{cls.__name__}: field {key}={value!r} is not supported by peft_engine "
                        f"(only {neutral!r} is)"
                    )
            elif key not in ("peft_version", "auto_mapping"):
                unknown.append(key)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring keys unknown to peft_engine: {', '.join(sorted(unknown))}",
                stacklevel=3,
            )
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> PeftConfig:
        """Read ``adapter_config.json`` from a folder (or the file itself)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else str(path)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {CONFIG_NAME} at {path!s}")
        try:
            with open(file, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
        data.update(overrides)
        return cls.from_dict(data)


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set):
        return sorted(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
