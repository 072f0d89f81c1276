"""How a bad sweep file is reported: every problem at once, each as ``file:line: field = value: problem; allowed: ...``.

Validators deep inside the schema only know a field path relative to their own section; this
module turns those paths (and pydantic's own errors) into lines a person can act on without
reading the schema: the YAML line, the dotted field, the bad value and what is allowed. It also
reads the YAML itself, because PyYAML's silent handling of duplicate keys and its syntax
errors need the same treatment before the schema ever sees the data.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel


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
    """One problem found by a validator, before it knows its file and line."""

    path: tuple  # field path relative to the model that found it
    text: str  # the rest of the line: value, problem and what is allowed
    at: tuple = ()  # deeper path (e.g. a list item) used only to find the YAML line


class Issues(ValueError):
    """Raised inside validators to hand several :class:`Issue` s up through pydantic at once."""

    def __init__(self, issues: list[Issue]):
        super().__init__("; ".join(f"{dotted(i.path)}: {i.text}" for i in issues))
        self.issues = issues


def show(value: Any) -> str:
    """A value as it appears in a problem line, cut short so one bad list cannot flood the report."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def dotted(path: tuple) -> str:
    """``("space", "targets", 1)`` -> ``space.targets[1]``: the spelling used in the docs."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def read_yaml(path: Path) -> tuple[Any, dict[tuple, int]]:
    """The file's data and each key path's line; a missing file, bad YAML or a duplicate key is a SpaceError."""
    if not path.is_file():
        near = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise SpaceError(str(path), [f"{path}: no such file; allowed: an existing YAML file"
                                     + (f" (in {path.parent}: {', '.join(near)})" if near else "")])
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
        lines, dups = _yaml_lines(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpaceError(str(path), [f"{where}: YAML syntax error: {problem}; "
                                     "allowed: valid YAML (check indentation, quotes and colons)"]) from None
    if dups:
        raise SpaceError(str(path), [f"{path}:{lines.get(p, '?')}: {dotted(p)}: duplicate key; allowed: each key once"
                                     for p in dups])
    return data, lines


def problem_lines(source: str, issues: list[Issue], lines: dict[tuple, int]) -> list[str]:
    """The report's lines in file order; a path with no line of its own takes its nearest parent's."""
    def line(i: Issue) -> int | None:
        for p in (i.at or i.path, i.path):
            while p and p not in lines:
                p = p[:-1]
            if p:
                return lines[p]
        return None

    ordered = sorted(issues, key=lambda i: line(i) or 0)
    return [f"{source}{f':{n}' if (n := line(i)) else ''}: {dotted(i.path) or '<top>'}"
            f"{' ' if i.text.startswith('=') else ': '}{i.text}" for i in ordered]


def issues_from(err: dict, root: type[BaseModel]) -> list[Issue]:
    """One pydantic error as readable issues; expands the :class:`Issues` our validators raise."""
    loc = tuple(err["loc"])
    found = (err.get("ctx") or {}).get("error")
    if isinstance(found, Issues):
        return [Issue(loc + i.path, i.text, loc + (i.at or i.path)) for i in found.issues]
    model, info = _model_and_field(root, loc)
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        keys = ", ".join(model.model_fields) if model else "?"
        near = difflib.get_close_matches(str(loc[-1]), list(model.model_fields) if model else [], 1)
        return [Issue(loc, f"= {show(err['input'])}: unknown key{f' (did you mean {near[0]!r}?)' if near else ''}; "
                           f"allowed keys: {keys}")]
    allowed = info.description if info and info.description else None
    if kind == "literal_error":
        msg, allowed = "not one of the options", err["ctx"]["expected"].replace(" or ", ", ")
    sub = _model_and_field(root, loc + ("_",))[0]
    if sub is not None and kind in ("model_type", "model_attributes_type", "missing"):
        allowed = f"a mapping with keys {', '.join(sub.model_fields)}"
    if kind == "missing":
        return [Issue(loc, f"is required; allowed: {allowed or 'see docs/SEARCH_SPACE.md'}")]
    return [Issue(loc, f"= {show(err.get('input'))}: {msg}" + (f"; allowed: {allowed}" if allowed and "allowed" not in msg else ""))]


def _model_and_field(root: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, Any]:
    """The model owning the last key of ``loc`` and that key's FieldInfo (None where unknown)."""
    model: Any = root
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
