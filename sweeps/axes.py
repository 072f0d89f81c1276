"""Sweep axes: how one YAML value becomes a fixed value, a categorical or a range, and how it is sampled.

Every axis of a sweep file (shared ones such as ``learning_rate`` and each method's own
hyperparameters) is written the same way: a fixed value or a one-key mapping such as
``{choice: [..]}`` or ``{loguniform: [lo, hi]}``. Parsing them in one place keeps the
spellings, the bound checks and the error wording identical everywhere, and keeps sampling
(Optuna's define-by-run, Ray Tune domains) consistent with what validation accepted.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .space_errors import Issue, show

CATEGORICAL, CONTINUOUS = ("choice", "grid"), ("uniform", "loguniform", "randint")
DISTRIBUTIONS = CATEGORICAL + CONTINUOUS
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_PRIMITIVE = (type(None), bool, int, float, str)


def to_number(value: Any) -> Any:
    """YAML 1.1 reads ``2e-4`` as a string; accept it as the number everyone means."""
    return float(value) if isinstance(value, str) and _NUMBER.fullmatch(value.strip()) else value


def is_number(value: Any) -> bool:
    """A finite int or float; bool is excluded although Python counts it as an int."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        if self.kind == "randint":
            return tune.randint(lo, hi + 1)  # Tune's upper bound is exclusive; ours is included
        return {"uniform": tune.uniform, "loguniform": tune.loguniform}[self.kind](lo, hi)


def parse_axis(raw: Any, path: tuple, *, dict_is_value: bool = False, numeric: bool = False) -> tuple[Axis | None, list[Issue]]:
    """Read a fixed value or a one-key distribution mapping; report malformed ones.

    ``dict_is_value``: a mapping whose keys are no distribution is a fixed value (e.g. lora's
    ``rank_pattern``) instead of a malformed axis. ``numeric``: strings such as ``"2e-4"`` are numbers.
    """
    allowed = "a fixed value or one of {choice: [..]}, {grid: [..]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]}, {randint: [lo, hi]}"
    conv = to_number if numeric else (lambda v: v)
    if isinstance(raw, dict) and (set(raw) & set(DISTRIBUTIONS) or not dict_is_value):
        if len(raw) != 1 or not set(raw) <= set(DISTRIBUTIONS):
            near = [m for k in raw for m in difflib.get_close_matches(str(k), DISTRIBUTIONS, 1)]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            return None, [Issue(path, f"= {show(raw)}: a distribution has exactly one key{hint}; allowed: {allowed}")]
        kind, arg = next(iter(raw.items()))
        if kind in CATEGORICAL:
            if not isinstance(arg, list) or not arg:
                return None, [Issue(path, f"= {show(raw)}: {kind} needs a non-empty list of candidates; allowed: {{{kind}: [a, b, ...]}}")]
            return Axis(kind, tuple(conv(v) for v in arg)), []
        bounds = [to_number(v) for v in arg] if isinstance(arg, list) else arg
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds) and bounds[0] < bounds[1]
        if kind == "randint":
            ok = ok and all(isinstance(b, int) or float(b).is_integer() for b in bounds)
            bounds = [int(b) for b in bounds] if ok else bounds
        if not ok or (kind == "loguniform" and bounds[0] <= 0):
            need = {"uniform": "numbers lo < hi", "loguniform": "numbers 0 < lo < hi", "randint": "integers lo < hi (both included)"}[kind]
            return None, [Issue(path, f"= {show(raw)}: bad {kind} bounds; allowed: {{{kind}: [lo, hi]}} with {need}")]
        return Axis(kind, tuple(bounds if kind == "randint" else map(float, bounds))), []  # float: an int field must fail
    if isinstance(raw, dict) and len(raw) == 1:
        near = difflib.get_close_matches(str(next(iter(raw))), DISTRIBUTIONS, 1, cutoff=0.7)
        if near:
            return None, [Issue(path, f"= {show(raw)}: unknown distribution (did you mean {near[0]!r}?); allowed: {allowed}")]
    return Axis("fixed", (conv(raw),)), []


def check_axis(axis: Axis, path: tuple, check: Callable[[Any], str | None], *, categorical_only: bool = False) -> list[Issue]:
    """Run ``check(value) -> error text | None`` on every candidate (both bounds of a range)."""
    if categorical_only and axis.kind in CONTINUOUS:
        return [Issue(path, f"= {{{axis.kind}: {list(axis.values)}}}: a range makes no sense here; "
                            "allowed: a fixed value, {choice: [..]} or {grid: [..]}")]
    issues = []
    for i, value in enumerate(axis.values):
        problem = check(value)
        if problem:
            where = "" if axis.fixed else (f" ({axis.kind} candidate {i})" if axis.kind in CATEGORICAL
                                           else f" ({axis.kind} {'lo' if i == 0 else 'hi'})")
            issues.append(Issue(path, f"= {show(value)}{where}: {problem}", path + ((axis.kind, i) if not axis.fixed else ())))
    return issues


class DefineByRun:
    """Optuna define-by-run space; a class (not a closure) so Tune can pickle the searcher.

    The method is sampled first and only its axes after it (``spec.axes_for(method)``), so a
    method's hyperparameters are never sampled, nor learned from, in trials of another method.
    """

    def __init__(self, spec: Any):
        self.spec = spec

    def __call__(self, trial: Any) -> dict[str, Any]:
        method = self.spec.space.axes["method"].suggest(trial, "method")
        # Return decoded values: they override Ray's captured (JSON-encoded) ones.
        return {"method": method, **{k: a.suggest(trial, k) for k, a in self.spec.axes_for(method).items()}}
