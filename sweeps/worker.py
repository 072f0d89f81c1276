"""One trial on one Ray Train worker: set up, train, evaluate, checkpoint.

The worker loads its own copy of the (quantized) base from the model cache onto its own
device, applies the trial's adapter, and trains with torch DDP (Ray Train sets up gloo on
CPU, NCCL on GPU). At every eval it hands metrics and, when due, an adapter-only checkpoint
(adapter files + optimizer state as safetensors: MBs, never the base) to its trial; a job
that carries a checkpoint resumes from it. Rank 0 also writes the metrics to the trial's
MLflow run. Which job a worker runs, and when, is :mod:`sweeps.pool`'s business.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "optimizer.safetensors"


@dataclass
class StepClock:
    """Time spent inside train and eval steps, so the sweep can report its own overhead."""

    train_s: float = 0.0
    eval_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def compute_s(self) -> float:
        return self.train_s + self.eval_s


Report = Callable[[dict[str, float], "Callable[[Path], None] | None"], bool]
"""How a worker hands an eval to its trial: metrics and, when one is due, a function that writes
the checkpoint into a folder; returns False when Tune stopped the trial (see :mod:`sweeps.pool`)."""


@dataclass
class Trial:
    """One trial attempt set up on one worker: everything before the first collective call."""

    job: dict[str, Any]
    model: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable_params: list[torch.nn.Parameter]
    trainable: int
    start_step: int
    total_steps: int
    train_loader: Any
    eval_loader: Any
    meta: dict[str, Any]
    resumed_metrics: dict[str, float] | None
    load_s: float


@dataclass
class WarmBase:
    """A base loaded before the pool's first job arrives, so that load overlaps the start of the
    sweep's first trial; the RNG state after the load keeps the job's adapter init the same."""

    quantization: str
    model: Any
    rng_state: torch.Tensor

    def take(self, quantization: str) -> Any:
        """The model if it has ``quantization`` (with the RNG as a fresh load leaves it), else None;
        either way it is let go here, so that two bases never share the device."""
        model, self.model = self.model, None
        if model is None or quantization != self.quantization:
            return None
        torch.set_rng_state(self.rng_state)
        return model


def load_trial_base(spec: Any, quantization: str, device: torch.device) -> Any:
    """The sweep's base from the model cache, seeded so that a new head is the same on every run."""
    from peft_engine.bases import load_base

    torch.manual_seed(spec.search.seed)
    model, _ = load_base(
        spec.base.model, task=spec.base.task, dtype=spec.base.dtype, device=device,
        quantization=quantization, trust_remote_code=spec.base.trust_remote_code,
        num_labels=spec.base.num_labels,
    )
    return model


def warm_base(spec: Any, device: torch.device) -> WarmBase:
    """Load the base for the space's first quantization candidate (what a first trial most likely uses)."""
    quantization = spec.space.axes["quantization"].candidates()[0]
    model = load_trial_base(spec, quantization, device)
    return WarmBase(quantization, model, torch.get_rng_state())


def prepare_trial(job: dict[str, Any], spec: Any, splits: Any, rank: int, world: int, device: torch.device,
                  warm: WarmBase | None = None) -> Trial:
    """Load the base from the model cache onto ``device`` (or take ``warm`` when it fits), apply the
    trial's adapter and restore its checkpoint. Raises for a bad trial (say, targets the model
    lacks) on every rank alike."""
    from peft_engine import get_method, get_peft_model
    from peft_engine.targets import resolve_target_preset

    from .data import make_eval_loader, make_loader

    params = job["params"]
    load_started = time.perf_counter()
    pad = splits.pad_token_id
    train_loader = make_loader(splits.train, spec.train.batch_size, shuffle=True, seed=spec.search.seed,
                               pad_token_id=pad, rank=rank, world_size=world, drop_last=True)
    eval_loader = make_eval_loader(splits, spec, rank=rank, world_size=world)
    total_steps = _total_steps(spec.train, len(train_loader))

    model = warm.take(params.quantization) if warm is not None else None
    if model is None:
        model = load_trial_base(spec, params.quantization, device)
    method = get_method(params.method)
    platform = {"task_type": "CAUSAL_LM" if spec.base.task == "causal_lm" else "SEQ_CLS"}
    if method.uses_targets:
        platform["target_modules"] = resolve_target_preset(params.targets, model)
    hyperparameters = dict(params.hyperparameters)
    if "total_step" in method.hyperparameters() and hyperparameters.get("total_step") is None:
        hyperparameters["total_step"] = total_steps  # AdaLoRA's budget schedule runs over the whole trial
    peft_config = method.build_config(platform, **hyperparameters)
    if params.quantization != "none":
        from peft_engine.quantization import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.train.gradient_checkpointing)
    elif spec.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = get_peft_model(model, peft_config)
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_adamw(trainable_params, params.learning_rate, params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(spec.train.lr_schedule, params.warmup_ratio, total_steps))
    start_step, resumed_metrics = _restore(job.get("resume_from"), model, optimizer, scheduler, params.weight_decay)
    meta = {"base": spec.base.model_dump(), "quantization": params.quantization, "method": params.method,
            "params": params.flat(), "data": spec.data.model_dump(), "seed": spec.search.seed}
    return Trial(job, model, optimizer, scheduler, trainable_params, sum(p.numel() for p in trainable_params),
                 start_step, total_steps, train_loader, eval_loader, meta, resumed_metrics,
                 time.perf_counter() - load_started)


def train_trial(trial: Trial, spec: Any, report: Report, *, rank: int, world: int, device: torch.device,
                tracking_uri: str) -> None:
    """Train one trial from its start step, evaluating and reporting every ``eval_every`` steps."""
    import ray.train.torch

    from .evaluate import evaluate
    from .loss import TrainingLoss
    from .tracking import TrialLogger

    model, optimizer, scheduler = trial.model, trial.optimizer, trial.scheduler
    loss_module = TrainingLoss(model, label_tokens=spec.base.task == "causal_lm", padding_free=spec.train.padding_free)
    ddp_loss = ray.train.torch.prepare_model(loss_module, move_to_device=False) if world > 1 else loss_module
    # AdaLoRA reallocates ranks from the gradients: after backward, before they are zeroed.
    update_and_allocate = getattr(model.base_model, "update_and_allocate", None)
    logger = TrialLogger(tracking_uri, trial.job["run_id"]) if rank == 0 else None
    start_step, total_steps = trial.start_step, trial.total_steps
    if logger:
        logger.log_metrics({"trainable_params": trial.trainable, "load_s": trial.load_s}, step=0)
        if start_step:  # a restarted worker group, a retried trial or a PBT exploit: where it picked up
            logger.log_metrics({"resumed_from_step": start_step}, step=start_step)
            logger.log_tags({"peft_sweeps.resumed_from_step": str(start_step)})
    if start_step >= total_steps:  # restored from its final checkpoint: Tune still needs the result
        report(trial.resumed_metrics or {}, None)
        return
    clock = StepClock()
    batches = _cycle(trial.train_loader, start_epoch=start_step // max(len(trial.train_loader), 1))
    for step in range(start_step, total_steps):
        ddp_loss.train()
        started = time.perf_counter()
        loss_value = 0.0
        for _ in range(spec.train.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = ddp_loss(**batch) / spec.train.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
            clock.tokens += int(batch["attention_mask"].sum())
        if spec.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trial.trainable_params, spec.train.max_grad_norm)
        optimizer.step()
        if update_and_allocate is not None:
            update_and_allocate(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.train_s += time.perf_counter() - started
        clock.steps += 1
        clock.losses.append(loss_value)
        done = step + 1
        if done % spec.train.eval_every and done != total_steps:
            continue
        started = time.perf_counter()
        metrics = evaluate(model, trial.eval_loader, task=spec.base.task, max_batches=spec.train.eval_batches,
                           padding_free=spec.train.padding_free)
        clock.eval_s += time.perf_counter() - started
        metrics.update(_train_metrics(clock, done, world, device, trial.trainable, len(trial.train_loader)))
        if loss_module.plan is not None:  # causal LMs: how many of this worker's batches ran padding-free
            metrics["packed_batch_share"] = loss_module.packed_batches / max(clock.steps * spec.train.grad_accum, 1)
        if logger:
            logger.log_metrics(metrics, step=done)
        clock.losses.clear()
        due = spec.train.checkpoint_every_eval or done == total_steps
        save = partial(_save_checkpoint, model=model, optimizer=optimizer, step=done, metrics=dict(metrics),
                       meta=trial.meta) if due and rank == 0 else None
        if not report(metrics, save):
            break  # Tune stopped the trial (ASHA, PBT) or it was superseded
    if logger:
        logger.close()


def make_adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its fused kernel where torch has one for these tensors (as transformers' Trainer
    defaults to): an adapter is hundreds of small tensors, and the per-tensor loop's dozen small
    ops each, multi-threaded, cost a measurable share of a CPU step (13.9 vs 3.2 ms at one thread
    for LoRA r=16 on SmolLM2's attention; far more when threads contend)."""
    fusable = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) and p.device.type in ("cpu", "cuda")
                  for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fusable or None)


def _total_steps(train: Any, batches_per_epoch: int) -> int:
    if train.max_steps is not None:
        return train.max_steps
    return max(1, math.ceil(train.epochs * batches_per_epoch / train.grad_accum))


def _schedule(kind: str, warmup_ratio: float, total: int):
    warmup = int(warmup_ratio * total)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - progress) if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _cycle(loader, start_epoch: int = 0):
    epoch = start_epoch
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _train_metrics(clock: StepClock, step: int, world: int, device: torch.device, trainable: int,
                   batches_per_epoch: int) -> dict[str, float]:
    train_loss = sum(clock.losses) / max(len(clock.losses), 1)
    if world > 1 and torch.distributed.is_initialized():
        value = torch.tensor([train_loss], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(value)
        train_loss = float(value) / world
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {
        "train_loss": train_loss,
        "step": step,
        "epoch": step / max(batches_per_epoch, 1),
        "step_time_s": clock.train_s / max(clock.steps, 1),
        "tokens_per_s": clock.tokens * world / max(clock.train_s, 1e-9),
        "peak_memory_mb": peak_mb,
        "trainable_params": trainable,
        "compute_s": clock.compute_s,
    }


def _save_checkpoint(folder: Path, model: Any, optimizer: torch.optim.Optimizer, step: int,
                     metrics: dict[str, float], meta: dict[str, Any]) -> None:
    """An adapter-only checkpoint: the adapter in HF PEFT's layout, AdamW state, step and metrics."""
    import ray

    from .serving import TRIAL_META

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    _save_optimizer(optimizer, folder)
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None  # for post-mortems
    (folder / TRAINER_STATE).write_text(json.dumps({"step": step, "metrics": metrics, "node_id": node}))
    (folder / TRIAL_META).write_text(json.dumps(meta, indent=2))


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW state as safetensors (no pickle): tensors by parameter index, the rest as JSON."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()
               if isinstance(value, torch.Tensor)}
    save_file(tensors, str(folder / OPTIMIZER_STATE))
    (folder / "optimizer.json").write_text(json.dumps(state["param_groups"]))


def _restore(folder: str | None, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
             weight_decay: float) -> tuple[int, dict[str, float] | None]:
    """Load adapter weights and optimizer state from a checkpoint folder; return the step to start
    at and the metrics saved with it. The learning rate and weight decay stay this trial's own (a
    PBT exploit continues a better trial's checkpoint with perturbed hyperparameters)."""
    if folder is None:
        return 0, None
    from peft_engine import set_peft_model_state_dict
    from peft_engine.save_load import load_adapter_file

    set_peft_model_state_dict(model, load_adapter_file(os.path.join(folder, "adapter_model.safetensors")))
    tensors = load_file(os.path.join(folder, OPTIMIZER_STATE))
    groups = json.loads(Path(folder, "optimizer.json").read_text())
    saved = json.loads(Path(folder, TRAINER_STATE).read_text())
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    step = saved["step"]
    scheduler.last_epoch = step  # the schedule at `step`, scaled from this trial's base learning rate
    for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"], group["weight_decay"] = base_lr, base_lr * factor(step), weight_decay
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return step, saved.get("metrics")
