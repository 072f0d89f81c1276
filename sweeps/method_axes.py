"""Per-method hyperparameter axes (``space.methods.X``), validated by the engine's own config classes.

The schema knows no method's fields: the allowed names are ``METHODS[m].hyperparameters()``
and every candidate value is built with ``METHODS[m].build_config``, so a new method needs no
change here and a sweep file is held to exactly the rules training will apply.

Some fields describe the training run rather than the adapter (AdaLoRA's ``total_step`` is the
number of optimizer steps). Making every sweep file repeat ``train.max_steps`` there invites
the two to disagree, so :data:`PLATFORM_DEFAULTS` derives such fields from the sweep file
when the method's axes leave them out.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from peft_engine.methods import METHODS, PLATFORM_FIELDS

from .axes import Axis, check_axis, parse_axis
from .space_errors import Issue, show


class PlatformDefault(NamedTuple):
    """A hyperparameter the platform fills in from the sweep file when the file leaves it out."""

    derive: Callable[[Any], Any]  # SweepSpec -> value, or None where it is only known once training starts
    placeholder: Any  # what validation builds with before the value is known
    origin: str  # where the value comes from, for error messages and docs


PLATFORM_DEFAULTS: dict[str, dict[str, PlatformDefault]] = {
    "adalora": {"total_step": PlatformDefault(lambda spec: spec.train.max_steps, 1000, "train.max_steps")},
}


class Derived(NamedTuple):
    """A platform default resolved for one sweep: its value, and whether it is the real one."""

    value: Any
    known: bool  # False: the placeholder (e.g. with train.epochs only the worker knows the step count)
    origin: str


def platform_values(method: str, spec: Any, given: Mapping[str, Any]) -> dict[str, Derived]:
    """The platform defaults of ``method`` that ``given`` leaves out.

    ``spec`` is the SweepSpec, or during validation the sections validated so far; a section
    that is missing (it failed validation) gives the placeholder, like a value not known yet.
    """
    out = {}
    for name, default in PLATFORM_DEFAULTS.get(method, {}).items():
        if name in given:
            continue
        try:
            value = default.derive(spec)
        except AttributeError:
            value = None
        out[name] = Derived(default.placeholder if value is None else value, value is not None, default.origin)
    return out


def parse_method_axes(method: str, hparams: dict, picked: list[str], method_ok: bool) -> tuple[dict[str, Axis], list[Issue]]:
    """The axes of ``space.methods.<method>``; issues for unknown methods, names and malformed axes."""
    path = ("methods", method)
    if method not in METHODS:
        return {}, [Issue(path, f"unknown method {method!r}; allowed: {', '.join(sorted(METHODS))}")]
    if method_ok and method not in picked:
        return {}, [Issue(path, f"method {method!r} is not on the method axis, so these would never be used; "
                                f"allowed: {', '.join(picked)}")]
    spec, issues, axes = METHODS[method], [], {}
    allowed = spec.hyperparameters()
    for hp, raw in hparams.items():
        if hp not in allowed:
            why = (" (set by the platform: use space.targets)" if hp in PLATFORM_FIELDS
                   else f" (fixed to {spec.fixed[hp]!r} by {method})" if hp in spec.fixed else "")
            issues.append(Issue(path + (hp,), f"unknown hyperparameter of {method}{why}; allowed: {', '.join(sorted(allowed))}"))
            continue
        axis, found = parse_axis(raw, path + (hp,), dict_is_value=True, numeric="float" in str(allowed[hp].type))
        issues += found
        if axis:
            axes[hp] = axis
    return axes, issues


def check_method(method: str, axes: dict[str, Axis], platform: Mapping[str, Derived], *, in_file: bool, whole: bool = True) -> list[Issue]:
    """Build every candidate of ``method``'s axes with the engine; then (``whole``) the method as a whole.

    Each candidate is built with the other axes at their first value, and blamed only when the
    engine's message names its field: fields that need each other (layers_pattern +
    layers_to_transform) pass together, and one bad value is one error. What no single value is
    to blame for (a required field, a platform value that does not fit) is reported once, at
    ``methods.<method>`` if the file has that entry (``in_file``), else at ``method``.
    """
    path, allowed = ("methods", method), METHODS[method].hyperparameters()
    rep = {hp: a.values[0] for hp, a in axes.items()}
    issues = []
    for hp, axis in axes.items():
        others = {k: v for k, v in rep.items() if k != hp}
        issues += check_axis(axis, path + (hp,), lambda v, hp=hp, ax=axis, o=others: _blame(method, o, hp, v, ax, allowed[hp].type, platform))
    if issues or not whole:
        return issues
    problem = build_error(method, rep, None, "", platform)
    if problem and in_file:
        return [Issue(path, f"= {show(rep)}: method {method} cannot be built from these values: {problem}")]
    if problem:
        return [Issue(("method",), f"= {method!r}: method {method} cannot be built from its defaults: {problem} "
                                   f"(set it under space.methods.{method})")]
    return []


def _names(field: str, text: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(field)}\b", text) is not None


def _blame(method: str, others: dict, hp: str, value: Any, axis: Axis, type_text: str, platform: Mapping[str, Derived]) -> str | None:
    """The engine's complaint about ``hp=value`` among ``others``, if it names ``hp``."""
    others = dict(others)
    while True:
        problem = build_error(method, {**others, hp: value}, axis, type_text, platform)
        if not problem or _names(hp, problem):
            return problem
        culprit = next((k for k in others if _names(k, problem)), None)  # another value's fault: retry without it
        if culprit is None:
            return None
        del others[culprit]


def build_error(method: str, hparams: dict, axis: Axis | None, type_text: str, platform: Mapping[str, Derived]) -> str | None:
    """The engine's own complaint about these hyperparameters (plus the platform's values), or None."""
    try:
        METHODS[method].build_config(**hparams, **{k: d.value for k, d in platform.items()})
    except (ValueError, TypeError, NotImplementedError) as exc:
        text = str(exc)
        text += "" if "allowed" in text else f"; allowed: {type_text or 'see the method config'}"
        if axis is not None and axis.kind in ("uniform", "loguniform") and "integer" in text:
            text += " (for integers use {randint: [lo, hi]} or {choice: [..]})"
        if axis is not None and axis.fixed and isinstance(axis.values[0], list):
            text += f" (to sweep values write {{choice: {show(axis.values[0])}}})"
        for name, d in platform.items():
            if _names(name, text):
                how = f"from {d.origin}" if d.known else f"a placeholder while {d.origin} is not known"
                text += f" ({name} = {d.value!r} is set by the platform, {how}; or set space.methods.{method}.{name})"
        return text
    return None
