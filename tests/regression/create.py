"""Write regression references: ``python -m tests.regression.create [--cases a,b | --all] [--allow-dirty]``.

Policy: creation REFUSES to run when ``git status --porcelain`` lists anything outside
``tests/regression/references/`` (modified, staged or untracked files). A reference must be
reproducible from a commit: each file records the commit it was computed at (metadata
``git_commit``), and a dirty tree would make that record a lie. The references folder itself is
exempt, so that references can be regenerated case by case, or twice in a row, before they
are committed together.

By default only cases without a reference are written (a new case never overwrites an old
one); ``--cases a,b`` rewrites the named cases and ``--all`` rewrites every case — do that only
when a change of outputs is intended, and say why in the commit.

``--allow-dirty`` is the escape hatch for bootstrapping: a helper adding a new method's case
cannot commit the method first. The files then record ``dirty=true``; whoever commits the
method should regenerate them from the clean commit (``--cases <new cases>``).

``pytest --regen-references`` does the same for the cases pytest selected (e.g. ``pytest
tests/regression -k dora --regen-references``), with no escape hatch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from tests.regression.cases import CASES, REFERENCES, compute, reference_path

REPO_ROOT = Path(__file__).resolve().parents[2]
EXEMPT = "tests/regression/references/"


class DirtyTreeError(RuntimeError):
    """The git tree has changes outside the references folder."""


def dirty_paths(root: Path = REPO_ROOT) -> list[str]:
    """Paths ``git status --porcelain`` reports, except those in the references folder."""
    result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"cannot create references: `git status` failed in {root}: {result.stderr.strip()}")
    paths = []
    for line in result.stdout.splitlines():
        path = line[3:].split(" -> ")[-1].strip('"')
        if not path.startswith(EXEMPT):
            paths.append(path)
    return paths


def git_commit(root: Path = REPO_ROOT) -> str:
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def refuse_if_dirty(allow_dirty: bool = False) -> bool:
    """Raise if the tree is dirty (unless allowed); return whether it is dirty."""
    dirty = dirty_paths()
    if dirty and not allow_dirty:
        shown = ", ".join(dirty[:8]) + (f" (+{len(dirty) - 8} more)" if len(dirty) > 8 else "")
        raise DirtyTreeError(
            f"refusing to write regression references: the git tree is dirty outside {EXEMPT} ({shown}). "
            "Commit first, so the references record the commit they come from (see tests/regression/create.py)."
        )
    return bool(dirty)


def write_reference(name: str, *, dirty: bool) -> Path:
    tensors = compute(CASES[name])
    REFERENCES.mkdir(parents=True, exist_ok=True)
    path = reference_path(name)
    metadata = {"case": name, "git_commit": git_commit(), "dirty": str(dirty).lower(),
                "torch": torch.__version__, "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.regression.create", description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cases", help="comma-separated case names to (re)write")
    which.add_argument("--all", action="store_true", help="rewrite every case")
    parser.add_argument("--allow-dirty", action="store_true", help="bootstrap only: write from a dirty tree")
    parser.add_argument("--list", action="store_true", help="list the cases and whether they have a reference")
    args = parser.parse_args(argv)
    if args.list:
        for name in sorted(CASES):
            print(f"{name}\t{'ok' if reference_path(name).is_file() else 'MISSING'}")
        return 0
    if args.cases:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in names if n not in CASES]
        if unknown:
            parser.error(f"unknown cases {unknown}; known: {', '.join(sorted(CASES))}")
    elif args.all:
        names = sorted(CASES)
    else:
        names = [n for n in sorted(CASES) if not reference_path(n).is_file()]
    if not names:
        print("every case has a reference; use --cases or --all to rewrite")
        return 0
    try:
        dirty = refuse_if_dirty(args.allow_dirty)
    except DirtyTreeError as exc:
        print(exc, file=sys.stderr)
        return 2
    for name in names:
        print(f"wrote {write_reference(name, dirty=dirty).relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
