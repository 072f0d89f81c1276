"""peft_engine vs HF PEFT (and the bare base model), side by side in one process.

    .venv/bin/python -m benchmarks.engine                 # tiny Llama + SmolLM2-135M-Instruct (~7 min, 2 cores)
    .venv/bin/python -m benchmarks.engine --quick         # tiny Llama only, few repeats (a smoke run)
    .venv/bin/python -m benchmarks.engine --models smollm2 --rows lora-r16-attn,dora-r16-attn --repeats 9

Rounds per row: SmolLM2 1 warmup + 5 timed training rounds and 3 inference rounds; the tiny
model 3 + 10 and 10 (``--warmup/--repeats/--infer-repeats`` override). Every row runs on the
tiny model; SmolLM2 runs the weight-adapting rows (prompt methods too with ``--rows all``).

For each row (a method and its settings) both engines wrap identical deep copies of one base,
get identical adapter weights (ours are drawn, perturbed away from their no-op init so the
update is real, then loaded into HF PEFT through the shared adapter file format) and the same
batch (4 x 128 tokens). Per repeat the training step (forward + backward + fused AdamW step) of
ours, HF PEFT's and the FLOOR run next to each other; then unmerged inference (ours, HF, base)
and merged inference (``merge_adapter()``: ours, HF, base). Medians are reported.

The floor is the frozen base with one trainable scalar multiplying the embedding output:
gradients flow back through every layer to the inputs, which any adapter at every layer must
pay too. ``overhead = step - floor`` (median of per-repeat differences) is what an engine can
still shrink; its ratio to HF PEFT's is the figure the goals are about.

A/A controls, because identical work in two copies of a model does not time the same: each
copy's tensors sit elsewhere in memory, and on this 2-core VM two identical SmolLM2 copies
differed by 3-5% in step time (IA3, 10 rounds), a tiny-Llama copy by up to 6% in inference.
Inference always times a deep copy of the base next to the base ("A/A copy x base"): a
merged-inference ratio within that spread is noise, not wrapper cost. ``--twin`` also times a
deep copy of our model in every training round ("A/A twin x ours"), one more step a round.

Memory, on CPU: bytes autograd saves for backward (activations; weights excluded) and the
trainable state (parameters + gradients + AdamW moments), both exact and noise-free; on CUDA
also ``torch.cuda.max_memory_allocated`` per step. Every timed call also records the minor page
faults it took (on CPU they move a step by tenths of a second; README, "Page faults").
Results: benchmarks/results/engine.json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import peft_engine
from sweeps.worker import make_adamw

from .common import (
    KEEP_FREED_HELP,
    Timings,
    command_line,
    copy_trainable_by_name,
    cuda_peak_mb,
    current_rss_mb,
    fmt,
    format_table,
    goal,
    interleaved,
    keep_freed_memory,
    mark,
    peak_rss_mb,
    perturb_trainable,
    saved_for_backward_mb,
    set_threads,
    trainable_state_mb,
    write_json,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
BATCH, SEQ_LEN = 4, 128
LR = 1e-5  # small: the weights barely move while we time, so every repeat does the same work


@dataclass(frozen=True)
class Row:
    """One benchmark row: a registered method, its hyperparameters, and the goals it is held to."""

    name: str
    method: str  # key of peft_engine.METHODS
    kwargs: dict[str, Any]
    targets: Any = None  # target_modules; None for prompt methods
    overhead_goal: float | None = None  # ours' overhead <= this x HF PEFT's
    total_goal: float = 1.00  # ours' step time <= this x HF PEFT's
    forward_kwargs: dict[str, Any] = field(default_factory=dict)
    model_kwargs: Callable[[Any], dict[str, Any]] | None = None  # hyperparameters read from the base config


ROWS: tuple[Row, ...] = (
    Row("lora-r16-attn", "lora", {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}, ATTENTION, 0.70),
    Row("lora-r64-all-linear", "lora", {"r": 64, "lora_alpha": 128, "lora_dropout": 0.0}, "all-linear", 0.85),
    Row("dora-r16-attn", "dora", {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}, ATTENTION, 1.00),
    Row("ia3-kv-down", "ia3", {"feedforward_modules": ["down_proj"]}, ["k_proj", "v_proj", "down_proj"]),
    Row("loha-r16-attn", "loha", {"r": 16, "alpha": 32}, ATTENTION, 0.50),
    Row("lokr-r16-attn", "lokr", {"r": 16, "alpha": 32}, ATTENTION, 0.50),
    Row("oft-b32-attn", "oft", {"r": 0, "oft_block_size": 32}, ATTENTION, 0.80),
    # Butterfly factor 1: without its CUDA extension (any CPU machine) HF PEFT silently forces 1,
    # so a larger factor would compare different work.
    Row("boft-b8-attn", "boft", {"boft_block_size": 8, "boft_n_butterfly_factor": 1}, ATTENTION),
    Row("vera-r256-attn", "vera", {"r": 256}, ATTENTION),
    Row("adalora-r12-attn", "adalora", {"init_r": 12, "target_r": 8, "lora_alpha": 32, "total_step": 1000},
        ATTENTION),
    Row("prompt_tuning-20", "prompt_tuning", {"num_virtual_tokens": 20}),
    Row("prefix_tuning-20", "prefix_tuning", {"num_virtual_tokens": 20}),
    Row("p_tuning-20", "p_tuning", {"num_virtual_tokens": 20, "encoder_hidden_size": 128}),
    Row("multitask_prompt_tuning-20", "multitask_prompt_tuning", {"num_virtual_tokens": 20, "num_tasks": 1},
        forward_kwargs={"task_ids": torch.zeros(BATCH, dtype=torch.long)}),
    Row("adaption_prompt-10", "adaption_prompt", {"adapter_len": 10},
        model_kwargs=lambda cfg: {"adapter_layers": cfg.num_hidden_layers}),
)
# Prompt methods lengthen the sequence rather than wrap layers, so they have no overhead goal, and
# run by default on the tiny model only (SmolLM2 with --rows all or naming them).
PROMPT_METHODS = frozenset({"prompt_tuning", "prefix_tuning", "p_tuning", "adaption_prompt", "multitask_prompt_tuning"})
MODELS = ("tiny", "smollm2")
TINY_CONFIG = {"vocab_size": 2048, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
               "tie_word_embeddings": True}


# ----------------------------------------------------------------------------- models and inputs


def load_model(name: str) -> tuple[torch.nn.Module, str]:
    """The base: a tiny Llama built from a config (seeded), or SmolLM2-135M-Instruct from the local cache."""
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
        label = "tiny Llama ({hidden_size}d, {num_hidden_layers} layers, from a config)".format(**TINY_CONFIG)
    elif name == "smollm2":
        from peft_engine.bases import load_base

        model, _ = load_base("smollm2-135m-instruct")
        label = "SmolLM2-135M-Instruct"
    else:
        raise ValueError(f"model={name!r} is not known; allowed: {', '.join(MODELS)}")
    model.config.use_cache = False  # no KV cache objects in a training step or a full-sequence forward
    model.requires_grad_(False)
    return model.eval(), label


def make_batch(vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, vocab_size, (BATCH, SEQ_LEN), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def build_pair(row: Row, base: torch.nn.Module, notes: list[str]) -> tuple[Any, Any]:
    """Our model and HF PEFT's on deep copies of ``base``, with identical (perturbed) adapter weights."""
    import peft

    spec = peft_engine.get_method(row.method)
    kwargs = dict(row.kwargs)
    if row.model_kwargs is not None:
        kwargs.update(row.model_kwargs(base.config))
    platform = {"task_type": "CAUSAL_LM"}
    if row.targets is not None:
        platform["target_modules"] = row.targets
    ours = peft_engine.get_peft_model(copy.deepcopy(base), spec.build_config(platform, **kwargs))
    perturb_trainable(ours)
    hf_fields = {k: v for k, v in {**kwargs, **platform, **spec.fixed}.items() if v is not None}
    try:
        hf_config = getattr(peft, spec.config_cls.__name__)(**hf_fields)
        hf = peft.get_peft_model(copy.deepcopy(base), hf_config)
    except Exception as exc:  # HF PEFT lacking a feature is a finding, not a crash
        notes.append(f"HF PEFT model not built: {type(exc).__name__}: {exc}"[:400])
        return ours, None
    if not copy_trainable_by_name(ours, hf):
        # Names or shapes differ: go through the adapter file format both engines share.
        try:
            peft.set_peft_model_state_dict(hf, peft_engine.get_peft_model_state_dict(ours))
            notes.append("weights copied through the adapter file format (parameter names/shapes differ)")
        except Exception as exc:
            notes.append(f"HF PEFT model has other weights (not copied): {type(exc).__name__}: {exc}"[:400])
    return ours, hf


class Floor:
    """The frozen base with a trainable scalar at the embedding output (see the module doc)."""

    def __init__(self, base: torch.nn.Module) -> None:
        self.base = base
        self.scale = torch.nn.Parameter(torch.ones((), device=next(base.parameters()).device))
        self.memory: dict[str, Any] | None = None

    def _hook(self, module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output * self.scale

    def __call__(self, **batch: Any) -> Any:
        # Hooked only while the floor runs: the base is also timed bare, and deep-copied for each row.
        handle = self.base.get_input_embeddings().register_forward_hook(self._hook)
        try:
            return self.base(**batch)
        finally:
            handle.remove()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.scale]


def train_step_fn(model: Any, params: list[torch.nn.Parameter], batch: dict[str, torch.Tensor],
                  tuner: Any = None) -> Callable[[], float]:
    """One optimizer step; AdaLoRA also re-allocates ranks after backward, as its training loop must."""
    optimizer = make_adamw(params, LR, 0.0)  # fused where torch can, as the sweep's workers and the Trainer use
    allocate = getattr(tuner, "update_and_allocate", None)
    state = {"step": 0}

    def step() -> float:
        loss = model(**batch).loss
        loss.backward()
        if allocate is not None:
            allocate(state["step"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        return float(loss.detach())

    return step


def trainable(model: Any) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _weights(model: Any) -> list[torch.Tensor]:
    module = model.base if isinstance(model, Floor) else model
    return list(module.parameters()) + list(module.buffers())


# ----------------------------------------------------------------------------- one row


def run_row(row: Row, base: torch.nn.Module, floor: Floor, batch: dict[str, torch.Tensor], device: torch.device,
            warmup: int, repeats: int, infer_warmup: int, infer_repeats: int, base_copy: torch.nn.Module,
            twin: bool = False) -> dict[str, Any]:
    notes: list[str] = []
    out: dict[str, Any] = {"row": row.name, "method": row.method, "hyperparameters": row.kwargs,
                           "targets": row.targets, "notes": notes}
    started = time.perf_counter()
    try:
        ours, hf = build_pair(row, base, notes)
    except Exception as exc:
        notes.append(f"our model not built: {type(exc).__name__}: {exc}"[:400])
        out["status"] = "error"
        return out
    extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in row.forward_kwargs.items()}
    train_batch = {**batch, "labels": batch["input_ids"], **extra}
    infer_batch = {**batch, **extra}
    models = {"ours": ours, "hf": hf}
    out["trainable_params"] = {k: sum(p.numel() for p in trainable(m)) if m is not None else None
                               for k, m in models.items()}

    # Same function? Both get the same weights and batch, so their losses must agree.
    with torch.no_grad():
        ours.train()
        losses = {"ours": float(ours(**train_batch).loss)}
        if hf is not None:
            hf.train()
            losses["hf"] = float(hf(**train_batch).loss)
    out["loss_check"] = {**losses, "abs_diff": abs(losses["ours"] - losses["hf"]) if "hf" in losses else None}
    if out["loss_check"]["abs_diff"] is not None and out["loss_check"]["abs_diff"] > 1e-3:
        notes.append(f"losses differ: ours {losses['ours']:.6f} vs HF {losses['hf']:.6f}")

    # Training steps: ours, HF, floor, interleaved.
    base.train()
    steps = {"ours": train_step_fn(ours, trainable(ours), train_batch, ours.base_model)}
    if hf is not None:
        steps["hf"] = train_step_fn(hf, trainable(hf), train_batch, hf.base_model)
    steps["floor"] = train_step_fn(floor, floor.parameters(), train_batch)
    ours_twin = copy.deepcopy(ours) if twin else None  # A/A: the very same model in its own memory (module doc)
    if ours_twin is not None:
        steps["ours_twin"] = train_step_fn(ours_twin, trainable(ours_twin), train_batch, ours_twin.base_model)
    out["train"] = _train_summary(interleaved(steps, warmup=warmup, repeats=repeats, device=device))

    # Memory, measured in extra untimed steps.
    memory: dict[str, Any] = {}
    for name, model in (("ours", ours), ("hf", hf), ("floor", floor)):
        if model is None:
            continue
        if model is floor and floor.memory is not None and not row.forward_kwargs:
            memory[name] = floor.memory  # the same every row
            continue
        params = floor.parameters() if model is floor else trainable(model)
        saved = saved_for_backward_mb(lambda m=model: m(**train_batch).loss, _weights(model))
        for p in params:
            p.grad = None
        memory[name] = {"saved_for_backward_mb": saved, "trainable_state_mb": trainable_state_mb(params),
                        "cuda_peak_mb": cuda_peak_mb(steps[name], device)}
    floor.memory = memory["floor"]
    out["memory"] = memory

    # Inference: unmerged, then merged (adapter folded into the weights, wrappers still in place).
    for m in (ours, hf, base):
        if m is not None:
            m.eval()
    out["infer_unmerged"] = _infer(models, base, base_copy, infer_batch, device, infer_warmup, infer_repeats)
    merged = {}
    for name, m in models.items():
        if m is None or not peft_engine.get_method(row.method).uses_targets:  # prompts have no weights to merge
            continue
        try:
            m.merge_adapter()
            merged[name] = m
        except Exception as exc:
            notes.append(f"{name}: merge_adapter() failed: {type(exc).__name__}: {exc}"[:300])
    if "ours" in merged:
        out["infer_merged"] = _infer(merged, base, base_copy, infer_batch, device, infer_warmup, infer_repeats)
    out["goals"] = _goals(row, out)
    out["status"] = "ok"
    out["wall_s"] = time.perf_counter() - started
    del ours, ours_twin, hf, models, merged, steps
    gc.collect()
    return out


def _train_summary(t: Timings) -> dict[str, Any]:
    s: dict[str, Any] = {"timings": t.to_json(), "ours_s": t.median("ours"), "hf_s": t.median("hf"),
                         "floor_s": t.median("floor"), "ratio_vs_hf": t.ratio("ours", "hf"),
                         "ours_overhead_s": t.paired_median("ours", "floor"),
                         "hf_overhead_s": t.paired_median("hf", "floor"), "spread_ours": t.spread("ours"),
                         "minor_faults_per_step": {name: t.median_faults(name) for name in t.samples}}
    if "ours_twin" in t.samples:
        s["twin_vs_ours"] = t.ratio("ours_twin", "ours")
    ho, oo = s["hf_overhead_s"], s["ours_overhead_s"]
    # A ratio of overheads only means something when HF's overhead stands above the noise.
    s["overhead_ratio_vs_hf"] = oo / ho if ho is not None and oo is not None and ho > 0 else None
    if "hf" in t.samples:  # 90% bootstrap intervals over rounds: how far the noise could move each ratio
        s["ratio_vs_hf_interval"] = t.interval(lambda b: b.ratio("ours", "hf"))
        s["overhead_ratio_vs_hf_interval"] = t.interval(overhead_ratio_of)
    return s


def overhead_ratio_of(t: Timings) -> float | None:
    """Ours' overhead over the floor / HF PEFT's, each a paired median (None where HF's is not above 0)."""
    ours, hf = t.paired_median("ours", "floor"), t.paired_median("hf", "floor")
    return ours / hf if ours is not None and hf is not None and hf > 0 else None


def _infer(models: dict[str, Any], base: torch.nn.Module, base_copy: torch.nn.Module,
           batch: dict[str, torch.Tensor], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    def call(m: Any) -> Callable[[], Any]:
        def fn() -> Any:
            with torch.inference_mode():
                return m(**batch)
        return fn

    fns = {name: call(m) for name, m in models.items() if m is not None}
    fns["base"] = call(base)
    fns["base_copy"] = call(base_copy)
    t = interleaved(fns, warmup=warmup, repeats=repeats, device=device)
    return {"timings": t.to_json(), "ours_s": t.median("ours"), "hf_s": t.median("hf"), "base_s": t.median("base"),
            "ours_vs_hf": t.ratio("ours", "hf"), "ours_vs_base": t.ratio("ours", "base"),
            "hf_vs_base": t.ratio("hf", "base"),
            "copy_vs_base": t.ratio("base_copy", "base")}


def _goals(row: Row, out: dict[str, Any]) -> dict[str, Any]:
    train = out["train"]
    goals = {"total_vs_hf": goal(train["ratio_vs_hf"], row.total_goal)}
    if row.overhead_goal is not None:
        goals["overhead_vs_hf"] = goal(train["overhead_ratio_vs_hf"], row.overhead_goal)
    if "infer_merged" in out:
        goals["merged_vs_base"] = goal(out["infer_merged"]["ours_vs_base"], 1.02)
    return goals


# ----------------------------------------------------------------------------- driver


def select_rows(spec: str | None, model: str) -> list[Row]:
    """Rows named (or whose method is named) in a comma list, or every row for ``all``; by default
    every row on the tiny model and the weight-adapting rows on SmolLM2. Methods not registered in
    peft_engine.METHODS are dropped (a method another change has not landed yet)."""
    if spec is None:
        return [r for r in ROWS if r.method in peft_engine.METHODS
                and (model == "tiny" or r.method not in PROMPT_METHODS)]
    wanted = None if spec.strip() == "all" else [w.strip() for w in spec.split(",") if w.strip()]
    if wanted:
        unknown = [w for w in wanted if not any(w in (r.name, r.method) for r in ROWS)]
        if unknown:
            raise SystemExit(f"--rows: unknown {', '.join(unknown)}; allowed: {', '.join(r.name for r in ROWS)}"
                             " or a method name")
    rows = [r for r in ROWS if wanted is None or r.name in wanted or r.method in wanted]
    return [r for r in rows if r.method in peft_engine.METHODS]


def unbenchmarked_methods() -> list[str]:
    """Registered methods without a row here (so a new method does not go unnoticed)."""
    return sorted(set(peft_engine.METHODS) - {r.method for r in ROWS})


def run_model(name: str, rows: list[Row], device: torch.device, warmup: int, repeats: int,
              infer_warmup: int, infer_repeats: int, twin: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    base, label = load_model(name)
    base.to(device)
    load_s = time.perf_counter() - started
    floor = Floor(base)
    base_copy = copy.deepcopy(base)  # A/A for inference: the same weights in other memory
    batch = make_batch(base.config.vocab_size, device)
    results = []
    for row in rows:
        print(f"  [{name}] {row.name} ...", flush=True)
        try:
            results.append(run_row(row, base, floor, batch, device, warmup, repeats, infer_warmup, infer_repeats,
                                   base_copy, twin))
        except Exception as exc:  # one broken row must not lose the others
            results.append({"row": row.name, "method": row.method, "status": "error",
                            "notes": [f"{type(exc).__name__}: {exc}"[:400]],
                            "traceback": traceback.format_exc()[-2000:]})
        print("    " + _one_line(results[-1]), flush=True)
    del base, floor, base_copy
    gc.collect()
    return {"model": name, "label": label, "load_s": load_s, "batch": [BATCH, SEQ_LEN], "warmup": warmup,
            "repeats": repeats, "infer_warmup": infer_warmup, "infer_repeats": infer_repeats, "rows": results,
            "wall_s": time.perf_counter() - started}


def _one_line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['row']}: {r.get('status')} {'; '.join(r.get('notes', []))}"
    t = r["train"]
    faults = "/".join(fmt(t["minor_faults_per_step"].get(k), ".0f") for k in ("ours", "hf", "floor"))
    return (f"ours {fmt(t['ours_s'])} s  HF {fmt(t['hf_s'])} s  floor {fmt(t['floor_s'])} s  "
            f"ratio {fmt(t['ratio_vs_hf'], '.3f')}  page faults/step ours/HF/floor {faults}  ({r['wall_s']:.0f} s)")


TABLE_COLUMNS = [
    ("row", "row"), ("ours", "ours s"), ("hf", "HF s"), ("ratio", "x HF"), ("g_total", "goal"),
    ("floor", "floor s"), ("o_ovh", "ours ovh"), ("h_ovh", "HF ovh"), ("ovh_ratio", "ovh x HF"),
    ("ovh_ci", "90% interval"), ("g_ovh", "goal"),
    ("unmerged", "unmerged x HF"), ("merged", "merged x base"), ("g_merged", "goal"), ("hf_merged", "HF merged x base"),
    ("aa_copy", "A/A copy x base"), ("aa_twin", "A/A twin x ours"),
    ("act", "act MB ours/HF"), ("loss_diff", "|dloss|"),
]


def format_interval(bounds: Any) -> str:
    """``[lo, hi]`` for the table, or nothing where no interval was computed."""
    return f"[{bounds[0]:.2f}, {bounds[1]:.2f}]" if bounds else ""


def table(model_result: dict[str, Any]) -> str:
    lines = []
    for r in model_result["rows"]:
        if r.get("status") != "ok":
            lines.append({"row": r["row"], "ours": "error: " + "; ".join(r.get("notes", []))[:90]})
            continue
        t, g, mem = r["train"], r["goals"], r["memory"]
        um, mg = r.get("infer_unmerged", {}), r.get("infer_merged", {})
        ovh_goal = g.get("overhead_vs_hf")
        lines.append({
            "row": r["row"], "ours": fmt(t["ours_s"]), "hf": fmt(t["hf_s"]),
            "ratio": fmt(t["ratio_vs_hf"], ".3f") + " " + format_interval(t.get("ratio_vs_hf_interval")),
            "g_total": f"{mark(g['total_vs_hf'])} <={g['total_vs_hf']['limit']:.2f}",
            "floor": fmt(t["floor_s"]), "o_ovh": fmt(t["ours_overhead_s"]), "h_ovh": fmt(t["hf_overhead_s"]),
            "ovh_ratio": fmt(t["overhead_ratio_vs_hf"], ".3f"), "ovh_ci": format_interval(t.get("overhead_ratio_vs_hf_interval")),
            "g_ovh": f"{mark(ovh_goal)} <={ovh_goal['limit']:.2f}" if ovh_goal else "",
            "unmerged": fmt(um.get("ours_vs_hf"), ".3f"), "merged": fmt(mg.get("ours_vs_base"), ".3f"),
            "hf_merged": fmt(mg.get("hf_vs_base"), ".3f"),
            "g_merged": f"{mark(g.get('merged_vs_base'))} <=1.02" if "merged_vs_base" in g else "",
            "aa_copy": fmt(mg.get("copy_vs_base", um.get("copy_vs_base")), ".3f"),
            "aa_twin": fmt(t.get("twin_vs_ours"), ".3f"),
            "act": f"{fmt(mem.get('ours', {}).get('saved_for_backward_mb'), '.0f')}/"
                   f"{fmt(mem.get('hf', {}).get('saved_for_backward_mb'), '.0f')}",
            "loss_diff": fmt(r["loss_check"]["abs_diff"], ".1e"),
        })
    return format_table(lines, TABLE_COLUMNS)


def summary_lines(payload: dict[str, Any]) -> list[str]:
    """Goal counts per model, for run_all's combined summary."""
    out = []
    for m in payload["models"]:
        goals = [g for r in m["rows"] if r.get("status") == "ok" for g in r["goals"].values()]
        passed = sum(1 for g in goals if g["pass"])
        failed = [f"{r['row']}:{k}" for r in m["rows"] if r.get("status") == "ok"
                  for k, g in r["goals"].items() if g["pass"] is False]
        errors = [r["row"] for r in m["rows"] if r.get("status") != "ok"]
        line = f"engine [{m['model']}]: {passed}/{len(goals)} goals met"
        if failed:
            line += f"; missed: {', '.join(failed)}"
        if errors:
            line += f"; errors: {', '.join(errors)}"
        out.append(line)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--rows", default=None,
                   help="comma list of row or method names, or 'all' (default: every row on tiny, "
                        "the weight-adapting rows on smollm2)")
    p.add_argument("--quick", action="store_true",
                   help="tiny model only, 1 warmup + 3 repeats, 1 thread unless --threads: checks it runs")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds per row (default 1; tiny 3)")
    p.add_argument("--repeats", type=int, default=None, help="timed training rounds (default 5; tiny 10)")
    p.add_argument("--infer-repeats", type=int, default=None, help="timed inference rounds (default 3; tiny 10)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all usable CPUs; 1 with --quick, which is robust on a busy machine)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    p.add_argument("--twin", action="store_true",
                   help="A/A check: also time a deep copy of our model in every training round (one more step a round)")
    p.add_argument("--name", default=None,
                   help="results file name under benchmarks/results/ (default engine, or engine_quick with --quick)")
    p.add_argument("--keep-freed-memory", action="store_true", help=KEEP_FREED_HELP)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    threads = set_threads(args.threads if args.threads or not args.quick else 1)
    if args.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(args.device)
    models = ["tiny"] if args.quick else [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"--models: unknown {m!r}; allowed: {', '.join(MODELS)}")
    skipped = unbenchmarked_methods()
    print(f"engine benchmark: {', '.join(models)}; torch threads {threads}; device {device}")
    if skipped:
        print(f"  registered methods with no row here: {', '.join(skipped)}")
    results = []
    for m in models:
        rows = select_rows(args.rows, m)
        # (warmup, repeats) for training, then for inference: a SmolLM2 run of every row stays
        # around 6-7 minutes on 2 quiet cores; the tiny model is cheap, so it gets more rounds.
        if args.quick:
            plan = (1, 3, 1, 3)
        elif m == "tiny":
            plan = (3, 10, 2, 10)
        else:
            plan = (1, 5, 1, 3)
        warmup = plan[0] if args.warmup is None else args.warmup
        repeats = plan[1] if args.repeats is None else max(1, args.repeats)
        infer_warmup = min(warmup, plan[2])
        infer_repeats = plan[3] if args.infer_repeats is None else max(1, args.infer_repeats)
        results.append(run_model(m, rows, device, warmup, repeats, infer_warmup, infer_repeats, args.twin))
    payload = {"quick": args.quick, "threads": threads, "device": str(device), "models": results,
               "methods_without_row": skipped, "peak_rss_mb": peak_rss_mb(), "rss_mb_at_end": current_rss_mb(),
               "goals": {"total": "ours step <= 1.00x HF PEFT in every row",
                         "overhead": {r.name: r.overhead_goal for r in ROWS if r.overhead_goal},
                         "merged": "ours merged inference <= 1.02x the bare base"}}
    path = write_json(args.name or ("engine_quick" if args.quick else "engine"), payload, command=command_line("benchmarks.engine", argv))
    for m in results:
        print(f"\n{m['label']} - batch {BATCH}x{SEQ_LEN}, {m['warmup']} warmup + {m['repeats']} timed training "
              f"rounds, {m['infer_repeats']} inference rounds (medians; ovh = step - floor, paired per round)")
        print(table(m))
    print("\n" + "\n".join(summary_lines(payload)))
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
