"""The regression rule of the registry gate: which metrics may get worse, and by how much.

A nightly sweep's winner is compared with the registered champion on every metric the sweep
file names in ``registry.thresholds`` (and on ``search.metric`` with
``registry.promotion_threshold`` when the thresholds leave it out). One metric worse by more
than its slack is a regression, even if the metric the search optimised improved: a lower
eval_loss bought with a perplexity blow-up on the same data still means something broke.
Pure functions with no MLflow or torch, so the rule is unit-tested on plain numbers and the
registry step only supplies the two metric dicts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

TIE_RTOL = 1e-6  # relative float noise between two runs of one configuration (measured: 5e-8)
METRIC_MODES = {"eval_loss": "min", "perplexity": "min", "accuracy": "max", "f1": "max"}
TASK_METRICS = {"causal_lm": ("eval_loss", "perplexity"), "seq_cls": ("eval_loss", "accuracy", "f1")}  # = sweeps.evaluate


def merge_rules(metric: str, promotion_threshold: float, thresholds: Mapping[str, float]) -> dict[str, float]:
    """Metric -> allowed slack: ``thresholds``, plus ``metric`` at ``promotion_threshold`` if not listed.

    ``SweepSpec.gate_rules()`` calls this with the sweep file's values; the search metric comes
    first so reports lead with the metric the sweep optimised.
    """
    rules = {metric: float(promotion_threshold)} if metric not in thresholds else {}
    return rules | {name: float(slack) for name, slack in thresholds.items()}


def regressions(candidate: Mapping[str, float], champion: Mapping[str, float], rules: Mapping[str, float]) -> list[str]:
    """One line per metric in ``rules`` on which ``candidate`` is worse than ``champion`` by more than its slack.

    Lower is better for eval_loss/perplexity, higher for accuracy/f1. Exactly the slack still
    passes, up to ``TIE_RTOL`` of the metric's size: the same configuration trained twice
    differs by about 1e-7 in eval_loss (thread-order rounding), which is a tie, not a regression; a NaN candidate fails (a diverged run is never "within" a
    threshold). An empty list means no regression. A metric missing from either dict is a
    ValueError: both sides come from the same evaluation, so that is a bug, not a verdict.
    """
    lines = []
    for name, slack in rules.items():
        if name not in METRIC_MODES:
            raise ValueError(f"gate rule metric={name!r} has no known direction; allowed: {', '.join(METRIC_MODES)}")
        for side, values in (("candidate", candidate), ("champion", champion)):
            if name not in values:
                raise ValueError(f"{side} metrics have no {name!r} to gate on; present: {', '.join(sorted(values)) or 'none'}")
        cand, champ, mode = float(candidate[name]), float(champion[name]), METRIC_MODES[name]
        better = "lower" if mode == "min" else "higher"
        if math.isnan(cand):
            lines.append(f"{name}: candidate is nan (champion {champ:.4f}); allowed: at most {slack:g} worse ({better} is better)")
            continue
        worse = cand - champ if mode == "min" else champ - cand
        if worse > slack + TIE_RTOL * max(abs(cand), abs(champ)):
            lines.append(f"{name}: candidate {cand:.4f} vs champion {champ:.4f} is {worse:.4g} worse ({better} is better); "
                         f"allowed: at most {slack:g} worse")
    return lines
