"""The Model Registry gate: register the winner, compare it with the champion, promote or refuse.

The winner becomes a new version of the space's registered model (tags: base model,
method, metric, sweep) under the alias ``candidate``. Candidate and champion are then
evaluated by the same :func:`sweeps.evaluate.evaluate` on the same held-out split, so the
comparison cannot drift from how trials were scored. The candidate takes ``champion`` unless
some gated metric (``registry.thresholds`` and the sweep's metric, see
:mod:`sweeps.gate_rules`) is worse than the champion's by more than its slack; then the
champion stays, and the comparison is kept as version tags and a report on the sweep's run.
Registering is idempotent per sweep: a resumed sweep reuses its version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CANDIDATE, CHAMPION = "candidate", "champion"


@dataclass
class GateOutcome:
    model_name: str
    version: str | None
    promoted: bool
    regression: bool
    metric: str
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    reason: str = ""

    def describe(self) -> str:
        if self.version is None:
            return f"registry: {self.reason}"
        head = f"registry: {self.model_name} version {self.version} ({CANDIDATE})"
        cand = self.candidate.get(self.metric)
        if self.champion_version is None:
            return f"{head} -> {CHAMPION} (first version; {self.metric}={cand:.4f})"
        champ = self.champion.get(self.metric)
        verdict = f"-> {CHAMPION}" if self.promoted else f"REGRESSION: {CHAMPION} stays version {self.champion_version}"
        return f"{head} {verdict} ({self.metric}: candidate {cand:.4f} vs champion {champ:.4f}; {self.reason})"


def gate_winner(spec: Any, tracker: Any, context: Any, winner: Any, *, register: bool = True) -> GateOutcome:
    import mlflow

    from .gate_rules import regressions
    from .serving import log_adapter_model
    from .tracking import SWEEP_TAG, TRIAL_TAG

    name, metric = spec.registry.model_name, spec.search.metric
    if not register:
        return GateOutcome(name, None, False, False, metric, reason="registry step skipped")
    client = tracker.client
    version = _existing_version(client, name, context.sweep_id)
    if version is None:
        run_id = tracker.find_run(**{SWEEP_TAG: context.sweep_id, TRIAL_TAG: winner.trial_id})
        model_uri = log_adapter_model(run_id, winner.checkpoint, tracker.tracking_uri)
        version = mlflow.register_model(model_uri, name, tags={
            "base_model": spec.base.model, "method": winner.method, "metric": metric,
            "sweep_run_id": context.parent_run_id, "peft_sweeps.sweep_id": context.sweep_id,
            "trial": winner.label, f"trial_{metric}": f"{winner.value:.6g}"}).version
    client.set_registered_model_alias(name, CANDIDATE, version)
    champion = _alias(client, name, CHAMPION)
    from .serving import load_adapter

    model, tokenizer, _ = load_adapter(winner.checkpoint)
    candidate_metrics = evaluate_adapter(spec, model, tokenizer)
    outcome = GateOutcome(name, str(version), True, False, metric, candidate=candidate_metrics)
    if champion is not None and str(champion.version) != str(version):
        outcome.champion_version = str(champion.version)
        outcome.champion = evaluate_adapter(spec, *_load_registered(name, champion.version))
        failing = regressions(candidate_metrics, outcome.champion, spec.gate_rules())
        outcome.promoted, outcome.regression = not failing, bool(failing)
        outcome.reason = "; ".join(failing) or "within " + ", ".join(f"{k} {v:g}" for k, v in spec.gate_rules().items())
    if outcome.promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    _record(client, tracker, context, outcome)
    return outcome


def _existing_version(client: Any, name: str, sweep_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name = '{name}' and tags.`peft_sweeps.sweep_id` = '{sweep_id}'")
    except MlflowException:
        return None
    return str(found[0].version) if found else None


def _alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _load_registered(name: str, version: str) -> tuple[Any, Any]:
    """The champion through its registered pyfunc loader: what serving would load."""
    import mlflow.pyfunc

    wrapper = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    return wrapper.model, wrapper.tokenizer


def evaluate_adapter(spec: Any, model: Any, tokenizer: Any) -> dict[str, float]:
    """Score a base + adapter on this sweep's held-out split with the trials' own evaluation."""
    from .data import build_for_spec, make_eval_loader
    from .evaluate import evaluate

    return evaluate(model, make_eval_loader(build_for_spec(spec, tokenizer), spec, all_rows=True), task=spec.base.task,
                    padding_free=spec.train.padding_free)


def _record(client: Any, tracker: Any, context: Any, outcome: GateOutcome) -> None:
    """Keep the comparison: tags on the version and a report on the sweep's parent run."""
    verdict = "promoted" if outcome.promoted else "regression"
    tags = {"gate": verdict, f"candidate_{outcome.metric}": f"{outcome.candidate.get(outcome.metric, float('nan')):.6g}"}
    if outcome.champion_version:
        tags.update({"compared_with_version": outcome.champion_version,
                     f"champion_{outcome.metric}": f"{outcome.champion.get(outcome.metric, float('nan')):.6g}"})
    for key, value in tags.items():
        client.set_model_version_tag(outcome.model_name, outcome.version, key, value)
    for key, value in {"registry.version": outcome.version, "registry.gate": verdict}.items():
        client.set_tag(context.parent_run_id, key, value)
    client.log_text(context.parent_run_id, _report(outcome), "registry_report.md")


def _report(outcome: GateOutcome) -> str:
    lines = [f"# Registry gate: {outcome.model_name} version {outcome.version}", "", outcome.describe(), "",
             "| metric | candidate | champion |", "|---|---|---|"]
    for key in sorted(set(outcome.candidate) | set(outcome.champion)):
        cand = outcome.candidate.get(key)
        champ = outcome.champion.get(key)
        lines.append(f"| {key} | {'' if cand is None else f'{cand:.6g}'} | {'' if champ is None else f'{champ:.6g}'} |")
    return "\n".join(lines) + "\n"
