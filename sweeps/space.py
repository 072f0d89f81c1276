"""The sweep-space YAML schema: validated in full before any Ray resource starts.

A sweep file names a base model, a data set, training settings and the axes to search
(method, targets, quantization, learning rate, ... and per-method hyperparameters that are
only sampled when their method is picked). Everything that can be checked without the
network is checked here, so that a typo fails in a second with ``file:line: field = value:
problem; allowed: ...`` instead of after a cluster has started. Method hyperparameters are
validated by the engine's own config classes (``peft_engine.methods``), so new methods need
no change here. :meth:`SweepSpec.tune_search` turns the axes into Ray Tune's inputs and
:meth:`SweepSpec.trial_params` turns what a trial receives back into :class:`TrialParams`.
See docs/SEARCH_SPACE.md for the reference.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from peft_engine.bases import PACKAGED_BASES as BASE_PACKAGES
from peft_engine.methods import METHODS, PLATFORM_FIELDS
from peft_engine.targets import TARGET_PRESETS
from peft_engine.tiny import TINY_NAMES

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
METRIC_MODES = {"eval_loss": "min", "perplexity": "min", "accuracy": "max", "f1": "max"}
TASK_METRICS = {"causal_lm": ("eval_loss", "perplexity"), "seq_cls": ("eval_loss", "accuracy", "f1")}  # = sweeps.evaluate
CATEGORICAL, CONTINUOUS = ("choice", "grid"), ("uniform", "loguniform", "randint")
DISTRIBUTIONS = CATEGORICAL + CONTINUOUS
SHARED_AXES = ("targets", "quantization", "learning_rate", "warmup_ratio", "weight_decay")
PACKAGED_BASES = (*BASE_PACKAGES, *TINY_NAMES)  # what peft_engine.bases.resolve_base finds offline
PACKAGED_DATASETS = ("chatterbot-corpus",)  # = sweeps.data.CHATTERBOT_SOURCE (that module imports datasets)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
MAX_GRID = 10_000  # a bigger grid is almost surely a mistake (and a huge list to ship to Tune)
_HUB_ID = re.compile(r"(?:[\w.\-]+/)?[\w.\-]{1,96}")  # huggingface_hub.utils.validate_repo_id's shape
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PRIMITIVE = (type(None), bool, int, float, str)


# ---- errors -------------------------------------------------------------------------------
class SpaceError(ValueError):
    """A sweep file is invalid; the message lists every problem as ``file:line: path: ...``."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = source, problems
        head = f"invalid sweep space {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        super().__init__("\n  ".join([head, *problems]))

    def __reduce__(self) -> tuple:  # picklable (Ray ships exceptions between processes)
        return type(self), (self.source, self.problems)


@dataclass
class Issue:
    path: tuple  # field path relative to the model that found it
    text: str  # the rest of the line: value, problem and what is allowed
    at: tuple = ()  # deeper path (e.g. a list item) used only to find the YAML line


class _Issues(ValueError):
    """Raised inside validators to hand several :class:`Issue` s to :func:`parse_space`."""

    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(f"{_dotted(i.path)}: {i.text}" for i in issues))
        self.issues = issues


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(path: tuple) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _num(value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` as a string; accept it as the number everyone means."""
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- axes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One sweep axis: a fixed value, a categorical (choice/grid) or a continuous range."""

    kind: str  # "fixed" or one of DISTRIBUTIONS
    values: tuple  # fixed: (value,); choice/grid: candidates; uniform/loguniform/randint: (lo, hi)

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    @property
    def encoded(self) -> bool:  # optuna categoricals take only None/bool/int/float/str
        return self.kind in CATEGORICAL and not all(isinstance(v, _PRIMITIVE) for v in self.values)

    def candidates(self) -> list:
        return list(self.values) if self.kind in ("fixed", *CATEGORICAL) else []

    def suggest(self, trial: Any, name: str) -> Any:
        if self.fixed:
            return self.values[0]
        if self.kind in CATEGORICAL:
            if self.encoded:
                return json.loads(trial.suggest_categorical(name, [json.dumps(v) for v in self.values]))
            return trial.suggest_categorical(name, list(self.values))
        lo, hi = self.values
        if self.kind == "randint":
            return trial.suggest_int(name, lo, hi)
        return trial.suggest_float(name, lo, hi, log=self.kind == "loguniform")

    def decode(self, value: Any) -> Any:
        if self.encoded and isinstance(value, str) and value not in self.values:
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value
        return value

    def tune_domain(self) -> Any:
        """The axis as a Ray Tune domain (for PBT's flat param_space and its mutations)."""
        from ray import tune

        if self.fixed:
            return self.values[0]
        if self.kind in CATEGORICAL:
            return tune.choice(list(self.values))
        lo, hi = self.values
        return {"uniform": tune.uniform, "loguniform": tune.loguniform}[self.kind](lo, hi) if self.kind != "randint" else tune.randint(lo, hi + 1)


def _parse_axis(raw: Any, path: tuple, *, dict_is_value: bool = False, numeric: bool = False) -> tuple[Axis | None, list[Issue]]:
    """Read a fixed value or a one-key distribution mapping; report malformed ones."""
    allowed = "a fixed value or one of {choice: [..]}, {grid: [..]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}"
    conv = _num if numeric else (lambda v: v)
    if isinstance(raw, dict) and (set(raw) & set(DISTRIBUTIONS) or not dict_is_value):
        if len(raw) != 1 or not set(raw) <= set(DISTRIBUTIONS):
            near = [m for k in raw for m in difflib.get_close_matches(str(k), DISTRIBUTIONS, 1)]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return None, [Issue(path, f"= {_show(raw)}: a distribution has exactly one key{hint}; allowed: {allowed}")]
        kind, arg = next(iter(raw.items()))
        if kind in CATEGORICAL:
            if not isinstance(arg, list) or not arg:
                return None, [Issue(path, f"= {_show(raw)}: {kind} needs a non-empty list of candidates; allowed: {{{kind}: [a, b, ...]}}")]
            return Axis(kind, tuple(conv(v) for v in arg)), []
        bounds = [_num(v) for v in arg] if isinstance(arg, list) else arg
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds) and bounds[0] < bounds[1]
        if kind == "randint":
            ok = ok and all(isinstance(b, int) or float(b).is_integer() for b in bounds)
            bounds = [int(b) for b in bounds] if ok else bounds
        if not ok or (kind == "loguniform" and bounds[0] <= 0):
            need = {"uniform": "numbers lo < hi", "loguniform": "numbers 0 < lo < hi", "randint": "integers lo < hi (both included)"}[kind]
            return None, [Issue(path, f"= {_show(raw)}: bad {kind} bounds; allowed: {{{kind}: [lo, hi]}} with {need}")]
        return Axis(kind, tuple(bounds if kind == "randint" else map(float, bounds))), []  # float: an int field must fail
    if isinstance(raw, dict) and len(raw) == 1:
        near = difflib.get_close_matches(str(next(iter(raw))), DISTRIBUTIONS, 1, cutoff=0.7)
        if near:
            return None, [Issue(path, f"= {_show(raw)}: unknown distribution (did you mean {near[0]!r}?); allowed: {allowed}")]
    return Axis("fixed", (conv(raw),)), []


def _check_axis(axis: Axis, path: tuple, check: Any, *, categorical_only: bool = False) -> list[Issue]:
    """Run ``check(value) -> error text | None`` on every candidate (both bounds of a range)."""
    if categorical_only and axis.kind in CONTINUOUS:
        return [Issue(path, f"= {{{axis.kind}: {list(axis.values)}}}: a range makes no sense here; "
                            "allowed: a fixed value, {choice: [..]} or {grid: [..]}")]
    issues = []
    for i, value in enumerate(axis.values):
        problem = check(value)
        if problem:
            where = "" if axis.fixed else (f" ({axis.kind} candidate {i})" if axis.kind in CATEGORICAL else f" ({axis.kind} {'lo' if i == 0 else 'hi'})")
            issues.append(Issue(path, f"= {_show(value)}{where}: {problem}", path + ((axis.kind, i) if not axis.fixed else ())))
    return issues


def _check_method(v: Any) -> str | None:
    if v not in METHODS:
        near = difflib.get_close_matches(str(v), list(METHODS), 1)
        return f"unknown method{f' (did you mean {near[0]!r}?)' if near else ''}; allowed: {', '.join(sorted(METHODS))}"
    return None


def _check_targets(v: Any) -> str | None:
    allowed = f"a preset ({', '.join(TARGET_PRESETS)}), a list of module names, or a regex string"
    if isinstance(v, list):
        return None if v and all(isinstance(t, str) and t for t in v) else f"not a non-empty list of names; allowed: {allowed}"
    if not isinstance(v, str) or not v:
        return f"not a string or list; allowed: {allowed}"
    if v in TARGET_PRESETS:
        return None
    if re.fullmatch(r"[\w\-]+", v):  # a bare name as a regex matches no dotted module name
        return f"neither a preset nor a regex (for module names write a list, e.g. [{v}]); allowed: {allowed}"
    try:
        re.compile(v)
    except re.error as exc:
        return f"not a valid regex ({exc}); allowed: {allowed}"
    return None


def _check_range(lo: float, hi: float | None, hi_open: bool, lo_open: bool = False) -> Any:
    text = f"a number {'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and {'<' if hi_open else '<='} {hi}")

    def check(v: Any) -> str | None:
        bad = not _is_number(v) or (v <= lo if lo_open else v < lo) or (hi is not None and (v >= hi if hi_open else v > hi))
        return f"not allowed; allowed: {text}" if bad else None

    return check


_SHARED_CHECKS = {
    "targets": (_check_targets, True),
    "quantization": (lambda v: None if v in QUANTIZATIONS else f"unknown quantization; allowed: {', '.join(QUANTIZATIONS)}", True),
    "learning_rate": (_check_range(0, 1, False, lo_open=True), False),
    "warmup_ratio": (_check_range(0, 1, True), False),
    "weight_decay": (_check_range(0, None, False), False),
}


# ---- sections -----------------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _source_problem(value: str, packaged: tuple[str, ...], suffixes: tuple[str, ...], model_dir: bool) -> str | None:
    """Why ``value`` names no packaged name, local file/folder or Hub id (offline: the Hub is not asked).

    Paths follow sweeps.data.load_raw / peft_engine.bases.resolve_base: an existing path, or one
    starting with . / ~ or ending in a known suffix, is local; anything else is a name or Hub id.
    """
    p = Path(value).expanduser()
    if value.startswith((".", "/", "~")) or p.suffix.lower() in (".gguf", *DATA_SUFFIXES) or p.exists():
        if not p.exists():
            return "no such file or folder"
        if p.is_dir():
            return None if model_dir and (p / "config.json").is_file() else "a folder that is not a Hugging Face model (no config.json)" if model_dir else "a folder, not a data file"
        return None if p.suffix.lower() in suffixes else "a file of an unsupported type"
    if value in packaged:
        return None
    near = ([n for n in packaged if n.startswith(value)] or difflib.get_close_matches(value, packaged, 1, cutoff=0.6)) if "/" not in value else []
    if near:
        return f"unknown name (did you mean {near[0]!r}?)"
    return None if _HUB_ID.fullmatch(value) and ".." not in value and "--" not in value else "not a valid Hub id"


class BaseSpec(_Model):
    model: str = Field(min_length=1, description=f"a packaged base ({', '.join(PACKAGED_BASES)}), a Hub id (org/name), a local model folder or a *.gguf file")
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = Field(False, description="true or false")
    num_labels: int | None = Field(None, ge=2, description="an integer >= 2 (seq_cls only; default: from the data)")

    @model_validator(mode="after")
    def _check(self) -> BaseSpec:
        issues = []
        if problem := _source_problem(self.model, PACKAGED_BASES, (".gguf",), model_dir=True):
            issues.append(Issue(("model",), f"= {self.model!r}: {problem}; allowed: {type(self).model_fields['model'].description}"))
        if self.num_labels is not None and self.task != "seq_cls":
            issues.append(Issue(("num_labels",), f"= {self.num_labels}: only used with task: seq_cls; allowed: null with task {self.task}"))
        if issues:
            raise _Issues(issues)
        return self


class DataSpec(_Model):
    source: str = Field(min_length=1, description=f"{', '.join(PACKAGED_DATASETS)}, a local {'/'.join(DATA_SUFFIXES)} file or a Hub dataset id (org/name)")
    prompt_field: str = Field("prompt", min_length=1, description="a column name")
    response_field: str = Field("response", min_length=1, description="a column name")
    text_field: str = Field("text", min_length=1, description="a column name")
    label_field: str = Field("label", min_length=1, description="a column name")
    system_prompt: str | None = Field(None, description="a string or null")
    eval_size: int = Field(64, gt=0, description="an integer > 0 (examples held out for eval)")
    max_train_examples: int | None = Field(None, gt=0, description="an integer > 0 or null (all)")
    seq_len: int = Field(128, ge=8, description="an integer >= 8 (tokens)")

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        if problem := _source_problem(self.source, PACKAGED_DATASETS, DATA_SUFFIXES, model_dir=False):
            raise _Issues([Issue(("source",), f"= {self.source!r}: {problem}; allowed: {type(self).model_fields['source'].description}")])
        return self


class TrainSpec(_Model):
    max_steps: int | None = Field(20, gt=0, description="an integer > 0, or null when epochs is set")
    epochs: float | None = Field(None, gt=0, description="a number > 0, or null when max_steps is set")
    batch_size: int = Field(4, ge=1, description="an integer >= 1 (per worker)")
    grad_accum: int = Field(1, ge=1, description="an integer >= 1")
    eval_every: int = Field(10, ge=1, description="an integer >= 1 (optimizer steps between evals)")
    eval_batches: int | None = Field(None, ge=1, description="an integer >= 1 or null (whole eval set)")
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="a number in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="a number >= 0")
    max_grad_norm: float | None = Field(1.0, gt=0, description="a number > 0 or null (no clipping)")
    gradient_checkpointing: bool = Field(False, description="true or false")
    checkpoint_every_eval: bool = Field(True, description="true or false")

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.epochs is not None and "max_steps" not in self.model_fields_set:
            self.max_steps = None  # giving epochs replaces the max_steps default
        if (self.max_steps is None) == (self.epochs is None):
            raise _Issues([Issue(("max_steps",), f"= {self.max_steps}, epochs = {self.epochs}: set exactly one; allowed: max_steps: N or epochs: X")])
        if self.max_steps is not None and self.eval_every > self.max_steps:
            raise _Issues([Issue(("eval_every",), f"= {self.eval_every}: larger than max_steps = {self.max_steps}, so no eval "
                                                  f"would be reported; allowed: an integer in [1, {self.max_steps}]")])
        return self


class SchedulerSpec(_Model):
    type: Literal["asha", "none", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1, description="an integer >= 1 (evals before ASHA may stop a trial)")
    reduction_factor: float = Field(2.0, gt=1, description="a number > 1")
    perturbation_interval: int = Field(2, ge=1, description="an integer >= 1 (evals between PBT perturbations)")


class SearchSpec(_Model):
    algorithm: Literal["grid", "random", "optuna"] = "random"
    num_samples: int | None = Field(None, ge=1, description="an integer >= 1 (default 1 for grid: repeats of the grid; 4 otherwise)")
    max_concurrent: int = Field(1, ge=1, description="an integer >= 1 (trials at once)")
    metric: Literal["eval_loss", "perplexity", "accuracy", "f1"] = "eval_loss"
    mode: Literal["min", "max"] | None = Field(None, description="min or max (default: from the metric)")
    seed: int = Field(0, ge=0, lt=2**32, description="an integer in [0, 2**32)")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    time_budget_s: float | None = Field(None, gt=0, description="a number of seconds > 0 or null")

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        want = METRIC_MODES[self.metric]
        if self.mode is not None and self.mode != want:
            raise _Issues([Issue(("mode",), f"= {self.mode!r}: metric {self.metric} is {want}imized; allowed: {want!r} (or omit mode)")])
        self.mode = want
        if self.num_samples is None:
            self.num_samples = 1 if self.algorithm == "grid" else 4
        return self


class ResourcesSpec(_Model):
    workers: int = Field(1, ge=1, description="an integer >= 1 (Ray Train workers per trial)")
    cpus_per_worker: float = Field(1.0, gt=0, description="a number > 0")
    gpus_per_worker: float = Field(0.0, ge=0, description="0, a fraction in (0, 1) or a whole number")
    worker_max_failures: int = Field(0, ge=-1, description="an integer >= 0, or -1 for unlimited")
    trial_max_failures: int = Field(0, ge=-1, description="an integer >= 0, or -1 for unlimited")

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise _Issues([Issue(("gpus_per_worker",), f"= {g}: a worker cannot hold part of a second GPU; allowed: 0, a fraction in (0, 1) or a whole number")])
        if 0 < g < 1 and self.workers > 1:
            raise _Issues([Issue(("gpus_per_worker",), f"= {g} with workers = {self.workers}: two ranks may share one GPU, which NCCL "
                                                       "refuses; allowed: a whole number with workers > 1, or workers: 1")])
        return self


with warnings.catch_warnings():  # "register" shadows ABCMeta.register on the class only; instances read the field
    warnings.filterwarnings("ignore", message='Field name "register"')

    class RegistrySpec(_Model):
        model_name: str | None = Field(None, min_length=1, pattern=r"^[^/:]+$", description="a name without '/' or ':' (default: <name>-adapter)")
        promotion_threshold: float = Field(0.0, ge=0, description="a number >= 0 (metric units the candidate may trail the champion by)")
        register: bool = Field(True, description="true or false")


class SpaceSpec(_Model):
    """The sweep axes as written; the parsed :class:`Axis` objects live in ``axes``/``method_axes``."""

    method: Any = Field(description=f"a method ({', '.join(sorted(METHODS))}) or {{choice|grid: [..]}} of methods")
    targets: Any = "all-linear"
    quantization: Any = "none"
    learning_rate: Any = 2e-4
    warmup_ratio: Any = None  # None: train.warmup_ratio
    weight_decay: Any = None  # None: train.weight_decay
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict, description="a mapping method -> {hyperparameter: value or distribution}")
    _axes: dict[str, Axis] = PrivateAttr(default_factory=dict)
    _method_axes: dict[str, dict[str, Axis]] = PrivateAttr(default_factory=dict)

    @property
    def axes(self) -> dict[str, Axis]:
        return dict(self._axes)

    @property
    def method_axes(self) -> dict[str, dict[str, Axis]]:
        return {m: dict(a) for m, a in self._method_axes.items()}

    @model_validator(mode="after")
    def _compile(self) -> SpaceSpec:
        issues: list[Issue] = []
        method_axis, found = _parse_axis(self.method, ("method",))
        issues += found
        if method_axis:
            issues += _check_axis(method_axis, ("method",), _check_method, categorical_only=True)
            self._axes["method"] = method_axis
        for name in SHARED_AXES:
            raw = getattr(self, name)
            if raw is None:
                continue
            if isinstance(raw, list) and name != "targets":
                issues.append(Issue((name,), f"= {_show(raw)}: a bare list is not an axis; allowed: {{choice: {_show(raw)}}} or {{grid: {_show(raw)}}}"))
                continue
            axis, found = _parse_axis(raw, (name,), numeric=name not in ("targets", "quantization"))
            issues += found
            if axis:
                check, categorical_only = _SHARED_CHECKS[name]
                issues += _check_axis(axis, (name,), check, categorical_only=categorical_only)
                self._axes[name] = axis
        picked = [m for m in (method_axis.candidates() if method_axis else []) if m in METHODS]
        broken = set()
        for method, hparams in self.methods.items():
            found = self._compile_method(method, hparams, picked, method_axis is not None)
            broken |= {method} if found else set()
            issues += found
        for method in [m for m in picked if m not in broken]:  # what no single value is to blame for, e.g. a required field
            rep = {hp: a.values[0] for hp, a in self._method_axes.get(method, {}).items()}
            if (problem := _build_error(method, rep, None, "")) and method in self.methods:
                issues.append(Issue(("methods", method), f"= {_show(rep)}: method {method} cannot be built from these values: {problem}"))
            elif problem:
                issues.append(Issue(("method",), f"= {method!r}: method {method} cannot be built from its defaults: {problem} "
                                                 f"(set it under space.methods.{method})"))
        quant = self._axes.get("quantization")
        if quant and any(q != "none" for q in quant.candidates()):
            for m in picked:
                if not METHODS[m].quantized_bases:
                    issues.append(Issue(("quantization",), f"= {_show(list(quant.values))}: method {m} cannot wrap quantized layers "
                                                           f"(quantized_bases=False); allowed with {m}: 'none'"))
        if issues:
            raise _Issues(issues)
        return self

    def _compile_method(self, method: str, hparams: dict, picked: list[str], method_ok: bool) -> list[Issue]:
        path = ("methods", method)
        if method not in METHODS:
            return [Issue(path, f"unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")]
        if method_ok and method not in picked:
            return [Issue(path, f"method {method!r} is not on the method axis, so these would never be used; allowed: {', '.join(picked)}")]
        spec, issues, axes = METHODS[method], [], {}
        allowed = spec.hyperparameters()
        for hp, raw in hparams.items():
            if hp not in allowed:
                why = " (set by the platform: use space.targets)" if hp in PLATFORM_FIELDS else (f" (fixed to {spec.fixed[hp]!r} by {method})" if hp in spec.fixed else "")
                issues.append(Issue(path + (hp,), f"unknown hyperparameter of {method}{why}; allowed: {', '.join(sorted(allowed))}"))
                continue
            numeric = "float" in str(allowed[hp].type)
            axis, found = _parse_axis(raw, path + (hp,), dict_is_value=True, numeric=numeric)
            issues += found
            if axis:
                axes[hp] = axis
        # Each candidate is built with the other axes at their first value, and blamed only
        # when the engine's message names its field: fields that need each other
        # (layers_pattern + layers_to_transform) pass together, and one bad value is one error.
        rep = {hp: a.values[0] for hp, a in axes.items()}
        for hp, axis in axes.items():
            others = {k: v for k, v in rep.items() if k != hp}
            issues += _check_axis(axis, path + (hp,), lambda v, hp=hp, ax=axis, o=others: _blame(method, o, hp, v, ax, allowed[hp].type))
        self._method_axes[method] = axes
        return issues


def _blame(method: str, others: dict, hp: str, value: Any, axis: Axis, type_text: str) -> str | None:
    """The engine's complaint about ``hp=value`` among ``others``, if it names ``hp``."""
    def names(field: str, text: str) -> bool:
        return re.search(rf"(?<![\w.]){re.escape(field)}\b", text) is not None

    others = dict(others)
    while True:
        problem = _build_error(method, {**others, hp: value}, axis, type_text)
        if not problem or names(hp, problem):
            return problem
        culprit = next((k for k in others if names(k, problem)), None)  # another value's fault: retry without it
        if culprit is None:
            return None
        del others[culprit]


def _build_error(method: str, hparams: dict, axis: Axis | None, type_text: str) -> str | None:
    """The engine's own complaint about these hyperparameters, or None."""
    try:
        METHODS[method].build_config(**hparams)
    except (ValueError, TypeError, NotImplementedError) as exc:
        text = str(exc)
        text += "" if "allowed" in text else f"; allowed: {type_text or 'see the method config'}"
        if axis is not None and axis.kind in ("uniform", "loguniform") and "integer" in text:
            text += " (for integers use {randint: [lo, hi]} or {choice: [..]})"
        if axis is not None and axis.fixed and isinstance(axis.values[0], list):
            text += f" (to sweep values write {{choice: {_show(axis.values[0])}}})"
        return text
    return None


# ---- the whole file -----------------------------------------------------------------------
class SweepSpec(_Model):
    """A validated sweep file; build it with :func:`load_space` or :func:`parse_space`."""

    name: str | None = Field(None, min_length=1, max_length=200, description="an MLflow experiment name (default: the file's stem)")
    base: BaseSpec
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    registry: RegistrySpec = Field(default_factory=RegistrySpec)
    space: SpaceSpec

    @model_validator(mode="after")
    def _cross_check(self, info: ValidationInfo) -> SweepSpec:
        source = (info.context or {}).get("source", "<dict>")
        self.name = self.name or (Path(source).stem if not source.startswith("<") else "sweep")
        self.registry.model_name = self.registry.model_name or re.sub(r"[/:]", "-", self.name) + "-adapter"
        issues, sp, algo = [], self.space, self.search.algorithm
        for name in ("warmup_ratio", "weight_decay"):
            if getattr(sp, name) is None:
                setattr(sp, name, getattr(self.train, name))
                sp._axes[name] = Axis("fixed", (getattr(self.train, name),))
            elif name in self.train.model_fields_set:
                issues.append(Issue(("train", name), f"= {getattr(self.train, name)}: also set as space.{name}; allowed: set it in one place (space.{name})"))
        for path, axis in self._all_axes():
            if algo == "grid" and axis.kind in CONTINUOUS:
                issues.append(Issue(path, f"= {{{axis.kind}: {list(axis.values)}}}: algorithm grid cannot enumerate a range; "
                                          "allowed with grid: a fixed value, {grid: [..]} or {choice: [..]} (or use search.algorithm: random/optuna)"))
            if algo != "grid" and axis.kind == "grid":
                issues.append(Issue(path, f"= {{grid: {_show(list(axis.values))}}}: grid needs search.algorithm: grid; "
                                          f"allowed with {algo}: {{choice: [..]}} or a range"))
        sched = self.search.scheduler.type
        if sched == "pbt" and algo != "random":
            issues.append(Issue(("search", "scheduler", "type"), f"= 'pbt' with algorithm {algo}: Ray's PBT cannot run with a search algorithm "
                                                                "or a grid; allowed: algorithm random with pbt, or scheduler asha/none"))
        elif sched == "pbt" and not self.pbt_mutations():
            issues.append(Issue(("search", "scheduler", "type"), "= 'pbt': PBT needs a swept learning_rate or weight_decay to perturb; "
                                                                "allowed: make space.learning_rate a distribution, or scheduler asha/none"))
        evals = -(-self.train.max_steps // self.train.eval_every) if self.train.max_steps else None  # + a final eval
        if sched == "asha" and evals is not None and self.search.scheduler.grace_period > evals:
            issues.append(Issue(("search", "scheduler", "grace_period"), f"= {self.search.scheduler.grace_period}: a trial reports only {evals} "
                                                                        f"evals (max_steps / eval_every, rounded up); allowed: an integer in [1, {evals}]"))
        metric, task = self.search.metric, self.base.task
        if metric not in TASK_METRICS[task]:
            issues.append(Issue(("search", "metric"), f"= {metric!r}: sweeps.evaluate does not compute it for task {task}; "
                                                      f"allowed: {', '.join(TASK_METRICS[task])}"))
        if not issues and algo == "grid" and (n := self._grid_size()) > MAX_GRID:
            issues.append(Issue(("space",), f"grid has {n} points; allowed: at most {MAX_GRID} (use algorithm random/optuna)"))
        if issues:
            raise _Issues(issues)
        return self

    def _all_axes(self) -> list[tuple[tuple, Axis]]:
        out = [(("space", n), a) for n, a in self.space._axes.items()]
        return out + [(("space", "methods", m, hp), a) for m, axes in self.space._method_axes.items() for hp, a in axes.items()]

    def _methods(self) -> list[str]:
        return self.space._axes["method"].candidates()

    def _axes_for(self, method: str) -> dict[str, Axis]:
        """Shared then own axes of ``method``; targets pinned to one value where it wraps no module."""
        axes = {n: self.space._axes[n] for n in SHARED_AXES}
        if not METHODS[method].uses_targets:
            axes["targets"] = Axis("fixed", (axes["targets"].candidates() or ["all-linear"])[:1])
        return axes | {f"{method}.{hp}": a for hp, a in self.space._method_axes.get(method, {}).items()}

    def _grid_size(self) -> int:
        return sum(math.prod(len(a.candidates()) for a in self._axes_for(m).values()) for m in self._methods())

    # ---- Ray Tune ---------------------------------------------------------------------------
    def grid_configs(self) -> list[dict[str, Any]]:
        """Every flat trial config of the grid: method x its own hyperparameters x shared axes."""
        out = []
        for method in self._methods():
            axes = self._axes_for(method)
            combos = itertools.product(*(a.candidates() for a in axes.values()))
            out += [{"method": method, **dict(zip(axes, combo))} for combo in combos]
        return out

    def count_trials(self) -> int:
        """Trials Tune will run: grid points x num_samples for grid, else num_samples."""
        n = self.search.num_samples or 1
        return self._grid_size() * n if self.search.algorithm == "grid" else n

    def tune_search(self) -> tuple[dict, Any]:
        """``(param_space, search_alg)`` for ``Tuner(param_space=..., tune_config=TuneConfig(search_alg=...))``.

        grid: ``{"params": tune.grid_search([...])}`` and no searcher (Tune repeats the whole grid
        ``num_samples`` times; pass ``max_concurrent_trials``, see :meth:`tune_config_kwargs`).
        random/optuna: ``{}`` and an OptunaSearch (RandomSampler / TPE, seeded) whose define-by-run
        space samples a method's hyperparameters only when that method is picked, wrapped in a
        ConcurrencyLimiter. pbt (random only; Ray's PBT refuses searchers): flat Tune domains for every
        axis and a seeded BasicVariantGenerator. Trials always receive the same flat keys.
        """
        from ray import tune

        s = self.search
        if s.algorithm == "grid":
            return {"params": tune.grid_search(self.grid_configs())}, None
        if s.scheduler.type == "pbt":
            from ray.tune.search.basic_variant import BasicVariantGenerator

            space = {n: a.tune_domain() for n, a in self.space._axes.items()}
            space.update({f"{m}.{hp}": a.tune_domain() for m in self._methods() for hp, a in self.space._method_axes.get(m, {}).items()})
            return space, BasicVariantGenerator(max_concurrent=s.max_concurrent, random_state=s.seed)
        import optuna
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        if s.algorithm == "random":
            sampler = optuna.samplers.RandomSampler(seed=s.seed)
        else:
            with warnings.catch_warnings():  # multivariate/group/constant_liar are "experimental" in optuna
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                sampler = optuna.samplers.TPESampler(seed=s.seed, multivariate=True, group=True, constant_liar=s.max_concurrent > 1,
                                                     n_startup_trials=min(10, max(2, (s.num_samples or 4) // 3)))
        searcher = OptunaSearch(space=_DefineByRun(self), metric=s.metric, mode=s.mode, sampler=sampler)
        return {}, ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)

    def tune_config_kwargs(self) -> dict[str, Any]:
        """metric, mode, num_samples, time_budget_s (and max_concurrent_trials for grid) for TuneConfig."""
        out = {"metric": self.search.metric, "mode": self.search.mode, "num_samples": self.search.num_samples,
               "time_budget_s": self.search.time_budget_s}
        return out | ({"max_concurrent_trials": self.search.max_concurrent} if self.search.algorithm == "grid" else {})

    def pbt_mutations(self) -> dict[str, Any]:
        """PBT's ``hyperparam_mutations``: the swept learning_rate / weight_decay as Tune domains."""
        axes = {n: self.space._axes.get(n) for n in ("learning_rate", "weight_decay")}
        return {n: (a.candidates() if a.kind in CATEGORICAL else a.tune_domain()) for n, a in axes.items() if a and not a.fixed}

    def trial_params(self, config: Mapping[str, Any]) -> TrialParams:
        """Decode what a trial receives (``config["params"]`` for grid, the flat dict otherwise)."""
        flat = config["params"] if isinstance(config.get("params"), Mapping) else config
        axes = self.space._axes

        def value(key: str, axis: Axis) -> Any:
            if key in flat:
                return axis.decode(flat[key])
            if axis.fixed:
                return axis.values[0]
            raise ValueError(f"trial config has no {key!r}; allowed keys: {', '.join(sorted(flat))}")

        method = value("method", axes["method"])
        if method not in self._methods():
            raise ValueError(f"trial config method={method!r} is not on this sweep's method axis; allowed: {', '.join(self._methods())}")
        own = self.space._method_axes.get(method, {})
        hparams = {hp: value(f"{method}.{hp}", a) for hp, a in own.items()}
        METHODS[method].build_config(**hparams)  # fail in the trial with the engine's message, not mid-training
        shared = {n: value(n, a) for n, a in self._axes_for(method).items() if n in SHARED_AXES}
        varied = tuple(hp for hp, a in own.items() if not a.fixed) + tuple(n for n in SHARED_AXES[2:] if not axes[n].fixed)
        return TrialParams(method=method, hyperparameters=hparams, varied=varied, **shared)


class _DefineByRun:
    """Optuna define-by-run space; a class (not a closure) so Tune can pickle the searcher."""

    def __init__(self, spec: SweepSpec):
        self.spec = spec

    def __call__(self, trial: Any) -> dict[str, Any]:
        axes = self.spec.space._axes
        method = axes["method"].suggest(trial, "method")
        return {"method": method, **{k: a.suggest(trial, k) for k, a in self.spec._axes_for(method).items()}}  # decoded values: they override Ray's captured (JSON-encoded) ones


@dataclass(frozen=True)
class TrialParams:
    """One trial's sampled choices. ``hyperparameters`` go to ``METHODS[method].build_config``."""

    method: str
    hyperparameters: dict[str, Any]
    targets: str | list[str]
    quantization: str
    learning_rate: float
    warmup_ratio: float
    weight_decay: float
    varied: tuple[str, ...] = field(default=())  # names swept (not fixed) in this space, for label()

    def flat(self) -> dict[str, str | int | float | bool]:
        """MLflow-safe params: method, the method's own hyperparameters by name, shared axes."""
        def safe(v: Any) -> str | int | float | bool:
            return v if isinstance(v, (str, int, float, bool)) else json.dumps(v, sort_keys=True)

        out: dict[str, Any] = {"method": self.method}
        shared = {n: getattr(self, n) for n in SHARED_AXES}
        out.update({(f"{self.method}.{k}" if k in shared or k == "method" else k): safe(v) for k, v in self.hyperparameters.items()})
        out.update({k: (",".join(v) if isinstance(v, list) else safe(v)) for k, v in shared.items()})
        return out

    def label(self) -> str:
        """Short run name, e.g. ``lora r=16 attention nf4 lr=0.0003``."""
        def fmt(v: Any) -> str:
            return f"{v:.3g}" if isinstance(v, float) else str(v)

        spec = METHODS.get(self.method)
        size = getattr(spec, "size_field", None)
        default = getattr(spec.hyperparameters().get(size), "default", None) if spec and size else None
        parts = [self.method] + ([f"{size}={self.hyperparameters.get(size, default)}"] if size else [])
        t = self.targets if getattr(spec, "uses_targets", True) else None
        parts += [] if t is None else ["+".join(t) if isinstance(t, list) else (t if t in TARGET_PRESETS else "re:" + t[:24])]
        parts += [self.quantization] if self.quantization != "none" else []
        short = {"learning_rate": "lr", "warmup_ratio": "warmup", "weight_decay": "wd", "lora_alpha": "alpha", "lora_dropout": "dropout"}
        for name in self.varied:
            if name != size:
                v = self.hyperparameters.get(name, getattr(self, name, None))
                parts.append(f"{short.get(name, name)}={fmt(v)}")
        return " ".join(parts)


# ---- entry points -------------------------------------------------------------------------
def load_space(path: str | Path) -> SweepSpec:
    """Read and validate a sweep YAML file; raise :class:`SpaceError` listing every problem."""
    path = Path(path)
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise SpaceError(str(path), [f"{path}: no such file; allowed: an existing YAML file" + (f" (in {path.parent}: {', '.join(near)})" if near else "")])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines, dups = _yaml_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpaceError(str(path), [f"{where}: YAML syntax error: {problem}; allowed: valid YAML (check indentation, quotes and colons)"]) from None
    if dups:
        raise SpaceError(str(path), [f"{path}:{lines.get(p, '?')}: {_dotted(p)}: duplicate key; allowed: each key once" for p in dups])
    return _parse(data, str(path), lines)


def parse_space(data: dict, source: str = "<dict>") -> SweepSpec:
    """Validate an already-loaded mapping; ``source`` names it in errors and defaults ``name``."""
    return _parse(data, source, {})


def _parse(data: Any, source: str, lines: dict[tuple, int]) -> SweepSpec:
    sections = ", ".join(SweepSpec.model_fields)
    if data is None:
        raise SpaceError(source, [f"{source}: the file is empty; allowed: a mapping with sections {sections} (base, data, space required)"])
    if not isinstance(data, dict):
        raise SpaceError(source, [f"{source}: top level = {_show(data)}; allowed: a mapping with sections {sections}"])
    try:
        return SweepSpec.model_validate(data, context={"source": source})
    except ValidationError as exc:
        issues = [i for err in exc.errors() for i in _issues_from(err)]

    def line(i: Issue) -> int | None:
        for p in (i.at or i.path, i.path):
            while p and p not in lines:
                p = p[:-1]
            if p:
                return lines[p]
        return None
    issues.sort(key=lambda i: (line(i) or 0))
    raise SpaceError(source, [f"{source}{f':{n}' if (n := line(i)) else ''}: {_dotted(i.path) or '<top>'}"
                              f"{' ' if i.text.startswith('=') else ': '}{i.text}" for i in issues])


def _issues_from(err: dict) -> list[Issue]:
    """One pydantic error as readable issues; expands the ``_Issues`` our validators raise."""
    loc = tuple(err["loc"])
    found = (err.get("ctx") or {}).get("error")
    if isinstance(found, _Issues):
        return [Issue(loc + i.path, i.text, loc + (i.at or i.path)) for i in found.issues]
    model, info = _model_and_field(loc)
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        keys = ", ".join(model.model_fields) if model else "?"
        near = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], 1)
        return [Issue(loc, f"= {_show(err['input'])}: unknown key{f' (did you mean {near[0]!r}?)' if near else ''}; allowed keys: {keys}")]
    allowed = info.description if info and info.description else None
    if kind == "literal_error":
        msg, allowed = "not one of the options", err["ctx"]["expected"].replace(" or ", ", ")
    sub = _model_and_field(loc + ("_",))[0]
    if sub is not None and kind in ("model_type", "model_attributes_type", "missing"):
        allowed = f"a mapping with keys {', '.join(sub.model_fields)}"
    if kind == "missing":
        return [Issue(loc, f"is required; allowed: {allowed or 'see docs/SEARCH_SPACE.md'}")]
    return [Issue(loc, f"= {_show(err.get('input'))}: {msg}" + (f"; allowed: {allowed}" if allowed and "allowed" not in msg else ""))]


def _model_and_field(loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The model owning the last key of ``loc`` and that key's FieldInfo (None where unknown)."""
    model: Any = SweepSpec
    for i, key in enumerate(loc):
        fields = getattr(model, "model_fields", {})
        if key not in fields:
            return (model if i == len(loc) - 1 else None), None
        if i == len(loc) - 1:
            return model, fields[key]
        ann = fields[key].annotation
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return None, None


def _yaml_lines(text: str) -> tuple[dict[tuple, int], list[tuple]]:
    """Map each key path to its 1-based line, and list duplicated keys (safe_load keeps the last)."""
    lines: dict[tuple, int] = {}
    dups: list[tuple] = []

    def walk(node: Any, path: tuple) -> None:
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, v in node.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
                if key in seen:
                    dups.append(path + (key,))
                seen.add(key)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines[path + (i,)] = item.start_mark.line + 1
                walk(item, path + (i,))

    walk(yaml.compose(text, Loader=yaml.SafeLoader), ())
    return lines, dups
