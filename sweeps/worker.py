"""The Ray Train worker loop: one data-parallel worker of one trial.

Each worker loads its own copy of the (quantized) base from the model cache onto its own
device, applies the trial's adapter, and trains with torch DDP (Ray Train sets up gloo on
CPU, NCCL on GPU). At every eval it reports metrics and an adapter-only checkpoint (adapter
files + optimizer state as safetensors: MBs, never the base); a restarted worker resumes
from the latest checkpoint. Rank 0 also writes the metrics to the trial's MLflow run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass, field
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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point given to ``TorchTrainer``; ``config`` is built by :mod:`sweeps.trial`."""
    import datasets
    import ray.train
    import ray.train.torch

    from peft_engine import get_method, get_peft_model
    from peft_engine.bases import load_base
    from peft_engine.targets import resolve_target_preset

    from .data import load_splits, make_loader
    from .evaluate import evaluate
    from .tracking import TrialLogger

    datasets.disable_progress_bars()
    spec, params = config["spec"], config["params"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(spec.search.seed)
    load_started = time.perf_counter()

    splits = load_splits(config["data_dir"])  # tokenized once by the driver (sweeps.run.prepare_data)
    pad = splits.pad_token_id
    train_loader = make_loader(splits.train, spec.train.batch_size, shuffle=True, seed=spec.search.seed,
                               pad_token_id=pad, rank=rank, world_size=world, drop_last=True)
    eval_loader = make_loader(splits.eval, spec.train.batch_size, shuffle=False, seed=spec.search.seed,
                              pad_token_id=pad, rank=rank, world_size=world, exact_shards=True)

    total_steps = _total_steps(spec.train, len(train_loader))

    model, tokenizer = load_base(
        spec.base.model, task=spec.base.task, dtype=spec.base.dtype, device=device,
        quantization=params.quantization, trust_remote_code=spec.base.trust_remote_code,
        num_labels=spec.base.num_labels,
    )
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
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    trainable_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable_params, lr=params.learning_rate, weight_decay=params.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(spec.train.lr_schedule, params.warmup_ratio, total_steps))
    start_step = _restore(ray.train.get_checkpoint(), model, optimizer, scheduler)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    # AdaLoRA reallocates ranks from the gradients: after backward, before they are zeroed.
    update_and_allocate = getattr(model.base_model, "update_and_allocate", None)

    meta = {"base": spec.base.model_dump(), "quantization": params.quantization, "method": params.method,
            "params": params.flat(), "data": spec.data.model_dump(), "seed": spec.search.seed}
    logger = TrialLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None
    if logger:
        logger.log_metrics({"trainable_params": trainable, "load_s": time.perf_counter() - load_started}, step=0)
        if start_step:  # a restarted worker group or a retried trial: the run shows where it picked up
            logger.log_metrics({"resumed_from_step": start_step}, step=start_step)
            logger.log_tags({"peft_sweeps.resumed_from_step": str(start_step)})
    clock = StepClock()
    batches = _cycle(train_loader, start_epoch=start_step // max(len(train_loader), 1))
    eval_every = spec.train.eval_every
    for step in range(start_step, total_steps):
        ddp_model.train()
        started = time.perf_counter()
        loss_value = 0.0
        for _ in range(spec.train.grad_accum):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = ddp_model(**batch).loss / spec.train.grad_accum  # AdaLoRA adds its orthogonality term
            loss.backward()
            loss_value += float(loss.detach())
            clock.tokens += int(batch["attention_mask"].sum())
        if spec.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable_params, spec.train.max_grad_norm)
        optimizer.step()
        if update_and_allocate is not None:
            update_and_allocate(step)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock.train_s += time.perf_counter() - started
        clock.steps += 1
        clock.losses.append(loss_value)
        done = step + 1
        if done % eval_every and done != total_steps:
            continue
        started = time.perf_counter()
        metrics = evaluate(ddp_model, eval_loader, task=spec.base.task, max_batches=spec.train.eval_batches)
        clock.eval_s += time.perf_counter() - started
        metrics.update(_train_metrics(clock, done, world, device, trainable, len(train_loader)))
        _report(metrics, model, optimizer, done, rank, meta, spec.train.checkpoint_every_eval or done == total_steps)
        if logger:
            logger.log_metrics(metrics, step=done)
        clock.losses.clear()
    if logger:
        logger.close()


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


def _report(metrics: dict[str, float], model: Any, optimizer: torch.optim.Optimizer, step: int, rank: int,
            meta: dict[str, Any], with_checkpoint: bool) -> None:
    import ray.train

    from .serving import TRIAL_META

    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            model.save_pretrained(folder)
            _save_optimizer(optimizer, Path(folder))
            node = ray.get_runtime_context().get_node_id()  # which machine wrote it, for post-mortems
            Path(folder, TRAINER_STATE).write_text(json.dumps({"step": step, "metrics": metrics, "node_id": node}))
            Path(folder, TRIAL_META).write_text(json.dumps(meta, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def _save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW state as safetensors (no pickle): tensors by parameter index, the rest as JSON."""
    state = optimizer.state_dict()
    tensors = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, slots in state["state"].items() for name, value in slots.items()
               if isinstance(value, torch.Tensor)}
    save_file(tensors, str(folder / OPTIMIZER_STATE))
    (folder / "optimizer.json").write_text(json.dumps(state["param_groups"]))


def _restore(checkpoint: Any, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any) -> int:
    """Load adapter weights and optimizer state from a checkpoint; return the step to start at."""
    if checkpoint is None:
        return 0
    from peft_engine import set_peft_model_state_dict
    from peft_engine.save_load import load_adapter_file

    with checkpoint.as_directory() as folder:
        set_peft_model_state_dict(model, load_adapter_file(os.path.join(folder, "adapter_model.safetensors")))
        tensors = load_file(os.path.join(folder, OPTIMIZER_STATE))
        groups = json.loads(Path(folder, "optimizer.json").read_text())
        step = json.loads(Path(folder, TRAINER_STATE).read_text())["step"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for _ in range(step):
        scheduler.step()
    return step
