"""The plain settings sections of a sweep file: base, data, train, search, resources, registry.

Each section is a strict pydantic model (unknown keys are errors) whose field descriptions
double as the "allowed: ..." part of error messages, so the schema and its error text cannot
drift apart. Checks that need two sections (metric vs task, grace period vs max_steps, ...)
live on :class:`sweeps.space.SweepSpec`, which runs them once every section is well-formed.
"""

from __future__ import annotations

import difflib
import re
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from peft_engine.base_specs import PACKAGED_BASES as BASE_PACKAGES
from peft_engine.tiny import TINY_NAMES

from .axes import is_number, to_number
from .gate_rules import METRIC_MODES
from .space_errors import Issue, Issues, show

PACKAGED_BASES = (*BASE_PACKAGES, *TINY_NAMES)  # what peft_engine.base_specs.resolve_base finds offline
PACKAGED_DATASETS = ("chatterbot-corpus",)  # = sweeps.data.CHATTERBOT_SOURCE (that module imports datasets)
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_HUB_ID = re.compile(r"(?:[\w.\-]+/)?[\w.\-]{1,96}")  # huggingface_hub.utils.validate_repo_id's shape


class StrictModel(BaseModel):
    """A section: unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid")


def _source_problem(value: str, packaged: tuple[str, ...], suffixes: tuple[str, ...], model_dir: bool) -> str | None:
    """Why ``value`` names no packaged name, local file/folder or Hub id (offline: the Hub is not asked).

    Paths follow sweeps.data.load_raw / peft_engine.base_specs.resolve_base: an existing path, or one
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


class BaseSpec(StrictModel):
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
            raise Issues(issues)
        return self


class DataSpec(StrictModel):
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
            raise Issues([Issue(("source",), f"= {self.source!r}: {problem}; allowed: {type(self).model_fields['source'].description}")])
        return self


class TrainSpec(StrictModel):
    max_steps: int | None = Field(20, gt=0, description="an integer > 0, or null when epochs is set")
    epochs: float | None = Field(None, gt=0, description="a number > 0, or null when max_steps is set")
    batch_size: int = Field(4, ge=1, description="an integer >= 1 (per worker)")
    grad_accum: int = Field(1, ge=1, description="an integer >= 1")
    eval_every: int = Field(10, ge=1, description="an integer >= 1 (optimizer steps between evals)")
    eval_batch_size: int | None = Field(None, ge=1, description="an integer >= 1 (per worker) or null (batch_size)")
    eval_batches: int | None = Field(None, ge=1, description="an integer >= 1 or null (whole eval set)")
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="a number in [0, 1)")
    weight_decay: float = Field(0.0, ge=0, description="a number >= 0")
    max_grad_norm: float | None = Field(1.0, gt=0, description="a number > 0 or null (no clipping)")
    gradient_checkpointing: bool = Field(False, description="true or false")
    padding_free: bool = Field(True, description="true or false (causal LMs: pack a batch's rows where faster)")
    checkpoint_every_eval: bool = Field(True, description="true or false")

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        if self.epochs is not None and "max_steps" not in self.model_fields_set:
            self.max_steps = None  # giving epochs replaces the max_steps default
        if (self.max_steps is None) == (self.epochs is None):
            raise Issues([Issue(("max_steps",), f"= {self.max_steps}, epochs = {self.epochs}: set exactly one; allowed: max_steps: N or epochs: X")])
        if self.max_steps is not None and self.eval_every > self.max_steps:
            raise Issues([Issue(("eval_every",), f"= {self.eval_every}: larger than max_steps = {self.max_steps}, so no eval "
                                                  f"would be reported; allowed: an integer in [1, {self.max_steps}]")])
        return self


class SchedulerSpec(StrictModel):
    type: Literal["asha", "none", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1, description="an integer >= 1 (evals before ASHA may stop a trial)")
    reduction_factor: float = Field(2.0, gt=1, description="a number > 1")
    perturbation_interval: int = Field(2, ge=1, description="an integer >= 1 (evals between PBT perturbations)")


class SearchSpec(StrictModel):
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
            raise Issues([Issue(("mode",), f"= {self.mode!r}: metric {self.metric} is {want}imized; allowed: {want!r} (or omit mode)")])
        self.mode = want
        if self.num_samples is None:
            self.num_samples = 1 if self.algorithm == "grid" else 4
        return self


class ResourcesSpec(StrictModel):
    workers: int = Field(1, ge=1, description="an integer >= 1 (Ray Train workers per trial)")
    cpus_per_worker: float = Field(1.0, gt=0, description="a number > 0")
    gpus_per_worker: float = Field(0.0, ge=0, description="0, a fraction in (0, 1) or a whole number")
    worker_max_failures: int = Field(0, ge=-1, description="an integer >= 0, or -1 for unlimited")
    trial_max_failures: int = Field(0, ge=-1, description="an integer >= 0, or -1 for unlimited")

    @model_validator(mode="after")
    def _check(self) -> ResourcesSpec:
        g = self.gpus_per_worker
        if g > 1 and not float(g).is_integer():
            raise Issues([Issue(("gpus_per_worker",), f"= {g}: a worker cannot hold part of a second GPU; allowed: 0, a fraction in (0, 1) or a whole number")])
        if 0 < g < 1 and self.workers > 1:
            raise Issues([Issue(("gpus_per_worker",), f"= {g} with workers = {self.workers}: two ranks may share one GPU, which NCCL "
                                                       "refuses; allowed: a whole number with workers > 1, or workers: 1")])
        return self


with warnings.catch_warnings():  # "register" shadows ABCMeta.register on the class only; instances read the field
    warnings.filterwarnings("ignore", message='Field name "register"')

    class RegistrySpec(StrictModel):
        model_name: str | None = Field(None, min_length=1, pattern=r"^[^/:]+$", description="a name without '/' or ':' (default: <name>-adapter)")
        promotion_threshold: float = Field(0.0, ge=0, description="a number >= 0 (metric units the candidate may trail the champion by)")
        thresholds: dict[Any, Any] = Field(default_factory=dict, description="a mapping metric -> number >= 0 (slack in that metric's units)")
        register: bool = Field(True, description="true or false")

        @model_validator(mode="after")
        def _check(self) -> RegistrySpec:
            """Names and values here; whether the task's evaluation computes a metric is SweepSpec's check."""
            issues, clean = [], {}
            for name, raw in self.thresholds.items():
                value = to_number(raw)
                if name not in METRIC_MODES:
                    near = difflib.get_close_matches(str(name), METRIC_MODES, 1)
                    issues.append(Issue(("thresholds", name), f"= {show(raw)}: unknown metric{f' (did you mean {near[0]!r}?)' if near else ''}; "
                                                              f"allowed: {', '.join(METRIC_MODES)}"))
                elif not is_number(value) or value < 0:
                    issues.append(Issue(("thresholds", name), f"= {show(raw)}: not allowed; allowed: a number >= 0 (slack in {name}'s units)"))
                else:
                    clean[name] = float(value)
            if issues:
                raise Issues(issues)
            self.thresholds = clean
            return self
