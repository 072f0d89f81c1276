"""The sweep-space YAML schema: validated in full before any Ray resource starts.

A sweep file names a base model, a data set, training settings and the axes to search
(method, targets, quantization, learning rate, ... and per-method hyperparameters that are
only sampled when their method is picked). Everything that can be checked without the
network is checked, so that a typo fails in a second with ``file:line: field = value:
problem; allowed: ...`` instead of after a cluster has started. This module holds the
``space`` section, the whole-file checks, the Ray Tune side (:meth:`SweepSpec.tune_search`)
and the trial side (:meth:`SweepSpec.trial_params` -> :class:`TrialParams`); the pieces it
builds on are sweeps.axes (one axis), sweeps.method_axes (per-method hyperparameters, checked
by the engine), sweeps.space_sections (the plain sections), sweeps.space_errors (reporting)
and sweeps.gate_rules (the registry's regression rule). See docs/SEARCH_SPACE.md.
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
from types import SimpleNamespace
from typing import Any

from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from peft_engine.methods import METHODS
from peft_engine.targets import TARGET_PRESETS

from .axes import CATEGORICAL, CONTINUOUS, Axis, DefineByRun, check_axis, is_number, parse_axis
from .gate_rules import TASK_METRICS, merge_rules
from .method_axes import check_method, parse_method_axes, platform_values
from .space_errors import Issue, Issues, SpaceError, issues_from, problem_lines, read_yaml, show
from .space_sections import (
    BaseSpec,
    DataSpec,
    RegistrySpec,
    ResourcesSpec,
    SearchSpec,
    StrictModel,
    TrainSpec,
)

__all__ = ["SpaceError", "SpaceSpec", "SweepSpec", "TrialParams", "load_space", "parse_space"]

QUANTIZATIONS = ("none", "int8", "nf4", "fp4")
SHARED_AXES = ("targets", "quantization", "learning_rate", "warmup_ratio", "weight_decay")
MAX_GRID = 10_000  # a bigger grid is almost surely a mistake (and a huge list to ship to Tune)


# ---- what the shared axes accept (each check: value -> problem text or None) ---------------
def _check_method(v: Any) -> str | None:
    if v not in METHODS:
        near = difflib.get_close_matches(str(v), list(METHODS), 1)
        return f"unknown method{f' (did you mean {near[0]!r}?)' if near else ''}; allowed: {', '.join(sorted(METHODS))}"
    return None


def _check_targets(v: Any) -> str | None:
    """A preset, a list or a regex; a bare word is refused because as a regex it matches nothing."""
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
    """A check for numbers in [lo, hi] (either end open), whose message states the interval."""
    text = f"a number {'>' if lo_open else '>='} {lo}" + ("" if hi is None else f" and {'<' if hi_open else '<='} {hi}")

    def check(v: Any) -> str | None:
        bad = not is_number(v) or (v <= lo if lo_open else v < lo) or (hi is not None and (v >= hi if hi_open else v > hi))
        return f"not allowed; allowed: {text}" if bad else None

    return check


_SHARED_CHECKS = {  # axis -> (check, categorical_only: a range of strings makes no sense)
    "targets": (_check_targets, True),
    "quantization": (lambda v: None if v in QUANTIZATIONS else f"unknown quantization; allowed: {', '.join(QUANTIZATIONS)}", True),
    "learning_rate": (_check_range(0, 1, False, lo_open=True), False),
    "warmup_ratio": (_check_range(0, 1, True), False),
    "weight_decay": (_check_range(0, None, False), False),
}


# ---- the axes ----------------------------------------------------------------------------
class SpaceSpec(StrictModel):
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
    def _compile(self, info: ValidationInfo) -> SpaceSpec:
        issues: list[Issue] = []
        method_axis, found = parse_axis(self.method, ("method",))
        issues += found
        if method_axis:
            issues += check_axis(method_axis, ("method",), _check_method, categorical_only=True)
            self._axes["method"] = method_axis
        for name in SHARED_AXES:
            raw = getattr(self, name)
            if raw is None:
                continue
            if isinstance(raw, list) and name != "targets":
                issues.append(Issue((name,), f"= {show(raw)}: a bare list is not an axis; allowed: {{choice: {show(raw)}}} or {{grid: {show(raw)}}}"))
                continue
            axis, found = parse_axis(raw, (name,), numeric=name not in ("targets", "quantization"))
            issues += found
            if axis:
                check, categorical_only = _SHARED_CHECKS[name]
                issues += check_axis(axis, (name,), check, categorical_only=categorical_only)
                self._axes[name] = axis
        picked = [m for m in (method_axis.candidates() if method_axis else []) if m in METHODS]
        sections = SimpleNamespace(**(info.context or {}).get("sections", {}))  # for platform defaults such as total_step
        for method, hparams in self.methods.items():
            axes, found = parse_method_axes(method, hparams, picked, method_axis is not None)
            if method in METHODS and (method in picked or method_axis is None):
                self._method_axes[method] = axes
                found += check_method(method, axes, platform_values(method, sections, axes), in_file=True, whole=not found)
            issues += found
        for method in [m for m in picked if m not in self.methods]:  # e.g. a required field left at its default
            issues += check_method(method, {}, platform_values(method, sections, {}), in_file=False)
        quant = self._axes.get("quantization")
        if quant and any(q != "none" for q in quant.candidates()):
            for m in picked:
                if not METHODS[m].quantized_bases:
                    issues.append(Issue(("quantization",), f"= {show(list(quant.values))}: method {m} cannot wrap quantized layers "
                                                           f"(quantized_bases=False); allowed with {m}: 'none'"))
        if issues:
            raise Issues(issues)
        return self


# ---- the whole file -----------------------------------------------------------------------
class SweepSpec(StrictModel):
    """A validated sweep file; build it with :func:`load_space` or :func:`parse_space`."""

    name: str | None = Field(None, min_length=1, max_length=200, description="an MLflow experiment name (default: the file's stem)")
    base: BaseSpec
    data: DataSpec
    # validate_default: _share must see a section left at its defaults too
    train: TrainSpec = Field(default_factory=TrainSpec, validate_default=True)
    search: SearchSpec = Field(default_factory=SearchSpec, validate_default=True)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, validate_default=True)
    registry: RegistrySpec = Field(default_factory=RegistrySpec, validate_default=True)
    space: SpaceSpec

    @field_validator("base", "data", "train", "search", "resources", "registry")
    @classmethod
    def _share(cls, section: Any, info: ValidationInfo) -> Any:
        """Hand each valid section to the space validator (it runs last), for platform-derived defaults."""
        if isinstance(info.context, dict):
            info.context.setdefault("sections", {})[info.field_name] = section
        return section

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
                issues.append(Issue(path, f"= {{grid: {show(list(axis.values))}}}: grid needs search.algorithm: grid; "
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
        issues += self._check_thresholds()
        if not issues and algo == "grid" and (n := self._grid_size()) > MAX_GRID:
            issues.append(Issue(("space",), f"grid has {n} points; allowed: at most {MAX_GRID} (use algorithm random/optuna)"))
        if issues:
            raise Issues(issues)
        return self

    def _check_thresholds(self) -> list[Issue]:
        """Gate metrics must be ones the task's evaluation produces, and the search metric's slack set once."""
        reg, task, metric, issues = self.registry, self.base.task, self.search.metric, []
        for name, slack in reg.thresholds.items():
            if name not in TASK_METRICS[task]:
                issues.append(Issue(("registry", "thresholds", name), f"= {slack}: sweeps.evaluate does not compute {name} for task "
                                                                      f"{task}; allowed: {', '.join(TASK_METRICS[task])}"))
        if metric in reg.thresholds and "promotion_threshold" in reg.model_fields_set and reg.thresholds[metric] != reg.promotion_threshold:
            issues.append(Issue(("registry", "promotion_threshold"), f"= {reg.promotion_threshold}: thresholds.{metric} = "
                                                                     f"{reg.thresholds[metric]} sets the same slack; allowed: "
                                                                     f"the same value ({reg.thresholds[metric]}) or only one of the two"))
        return issues

    def gate_rules(self) -> dict[str, float]:
        """Metric -> allowed slack for :func:`sweeps.gate_rules.regressions` (thresholds + search metric)."""
        return merge_rules(self.search.metric, self.registry.promotion_threshold, self.registry.thresholds)

    def _all_axes(self) -> list[tuple[tuple, Axis]]:
        out = [(("space", n), a) for n, a in self.space._axes.items()]
        return out + [(("space", "methods", m, hp), a) for m, axes in self.space._method_axes.items() for hp, a in axes.items()]

    def _methods(self) -> list[str]:
        return self.space._axes["method"].candidates()

    def axes_for(self, method: str) -> dict[str, Axis]:
        """The flat axes a trial of ``method`` samples: shared, then its own as ``<method>.<name>``.

        Targets are pinned to one value where the method wraps no module, so the grid does not
        multiply prompt-learning trials by target choices that change nothing.
        """
        axes = {n: self.space._axes[n] for n in SHARED_AXES}
        if not METHODS[method].uses_targets:
            axes["targets"] = Axis("fixed", (axes["targets"].candidates() or ["all-linear"])[:1])
        return axes | {f"{method}.{hp}": a for hp, a in self.space._method_axes.get(method, {}).items()}

    def _grid_size(self) -> int:
        return sum(math.prod(len(a.candidates()) for a in self.axes_for(m).values()) for m in self._methods())

    # ---- Ray Tune ---------------------------------------------------------------------------
    def grid_configs(self) -> list[dict[str, Any]]:
        """Every flat trial config of the grid: method x its own hyperparameters x shared axes."""
        out = []
        for method in self._methods():
            axes = self.axes_for(method)
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
        searcher = OptunaSearch(space=DefineByRun(self), metric=s.metric, mode=s.mode, sampler=sampler)
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
        """Decode what a trial receives (``config["params"]`` for grid, the flat dict otherwise).

        Platform-derived hyperparameters the file leaves out (AdaLoRA's ``total_step`` =
        ``train.max_steps``, see sweeps.method_axes) are filled in; with ``train.epochs`` the step
        count is unknown here, so it stays out and the worker must set it.
        """
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
        derived = platform_values(method, self, hparams)
        hparams |= {k: d.value for k, d in derived.items() if d.known}  # an unknown one (epochs) is the worker's to set
        placeholders = {k: d.value for k, d in derived.items() if not d.known}
        METHODS[method].build_config(**hparams, **placeholders)  # fail in the trial with the engine's message, not mid-training
        shared = {n: value(n, a) for n, a in self.axes_for(method).items() if n in SHARED_AXES}
        varied = tuple(hp for hp, a in own.items() if not a.fixed) + tuple(n for n in SHARED_AXES[2:] if not axes[n].fixed)
        return TrialParams(method=method, hyperparameters=hparams, varied=varied, **shared)


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
    data, lines = read_yaml(Path(path))
    return _parse(data, str(path), lines)


def parse_space(data: dict, source: str = "<dict>") -> SweepSpec:
    """Validate an already-loaded mapping; ``source`` names it in errors and defaults ``name``."""
    return _parse(data, source, {})


def _parse(data: Any, source: str, lines: dict[tuple, int]) -> SweepSpec:
    sections = ", ".join(SweepSpec.model_fields)
    if data is None:
        raise SpaceError(source, [f"{source}: the file is empty; allowed: a mapping with sections {sections} (base, data, space required)"])
    if not isinstance(data, dict):
        raise SpaceError(source, [f"{source}: top level = {show(data)}; allowed: a mapping with sections {sections}"])
    try:
        return SweepSpec.model_validate(data, context={"source": source})
    except ValidationError as exc:
        issues = [i for err in exc.errors() for i in issues_from(err, SweepSpec)]
    raise SpaceError(source, problem_lines(source, issues, lines))
