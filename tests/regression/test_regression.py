"""Output regression: each registered case (see cases.py) against its stored reference, atol 1e-5.

A failure means the numbers a fixed tiny model produces changed. If that is intended (a bug
fix, a deliberate change of initialisation), rewrite the affected references from a clean,
committed tree and say why in the commit: ``python -m tests.regression.create --cases NAME``
or ``pytest tests/regression -k NAME --regen-references`` (see create.py for the policy).
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.regression.cases import CASES, compute, reference_path
from tests.regression.create import DirtyTreeError, refuse_if_dirty, write_reference


def _load(name: str) -> dict[str, torch.Tensor]:
    with safe_open(str(reference_path(name)), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_match_reference(name, request):
    if request.config.getoption("--regen-references"):
        try:
            dirty = refuse_if_dirty()
        except DirtyTreeError as exc:
            pytest.fail(str(exc), pytrace=False)
        write_reference(name, dirty=dirty)
    path = reference_path(name)
    if not path.is_file():
        pytest.fail(f"case {name!r} has no reference {path.name}; create it with "
                    f"`python -m tests.regression.create --cases {name}`", pytrace=False)
    expected = _load(name)
    actual = compute(CASES[name])
    assert set(actual) == set(expected), (
        f"tensor names changed: new {sorted(set(actual) - set(expected))[:4]}, "
        f"gone {sorted(set(expected) - set(actual))[:4]}")
    for key in sorted(expected):
        torch.testing.assert_close(actual[key], expected[key], atol=CASES[name].atol, rtol=0,
                                   msg=lambda m, key=key: f"{name}: {key}: {m}")


def test_cases_cover_the_lora_family():
    for name in ("lora", "dora", "rslora", "pissa", "olora", "embedding", "conv", "gpt2-conv1d",
                 "modules-to-save-seq-cls"):
        assert name in CASES


def test_dirty_tree_is_refused(monkeypatch):
    import tests.regression.create as create

    monkeypatch.setattr(create, "dirty_paths", lambda root=None: ["peft_engine/model.py"])
    with pytest.raises(DirtyTreeError, match="dirty outside tests/regression/references/.*peft_engine/model.py"):
        create.refuse_if_dirty()
    assert create.main(["--cases", "lora"]) == 2
    assert create.refuse_if_dirty(allow_dirty=True) is True
