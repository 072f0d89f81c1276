"""AdaLoRA's rank allocator: importance scores, the budget schedule, and masking.

Every step (after ``backward``) each AdaLoRA parameter's sensitivity ``|p * grad|`` is
smoothed (``beta1``) and its uncertainty ``|sensitivity - smoothed|`` tracked (``beta2``);
an element's score is their product. A triplet's (one rank of one layer) importance is its
E score plus the mean scores of its row of A and column of B. The budget (total rank) is
``init_r * layers`` during ``tinit`` steps, falls cubically to ``target_r * layers``, and
stays there for the final ``tfinal`` steps; every ``deltaT`` steps the least important
triplets beyond the budget get E = 0. Parameter names (the keys of ``rank_pattern``) are the
wrapped model's own, as in HF PEFT.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import AdaLoraConfig


class RankAllocator:
    def __init__(self, model: nn.Module, config: AdaLoraConfig, adapter_name: str) -> None:
        self.config = config
        self.adapter_name = adapter_name
        self.reset_ipt()
        self.triplets = sorted({n.replace(".lora_A.", ".%s.") for n, _ in self._named(model, "lora_A")})
        self.init_bgt = sum(p.shape[0] for _, p in self._named(model, "lora_A"))
        self.target_bgt = config.target_r * len(self.triplets)

    def reset_ipt(self) -> None:
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    def _named(self, model: nn.Module, attr: str | None = None):
        attrs = (attr,) if attr else ("lora_A", "lora_B", "lora_E")
        suffixes = tuple(f".{a}.{self.adapter_name}" for a in attrs)
        return [(n, p) for n, p in model.named_parameters() if n.endswith(suffixes)]

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether to re-mask now)."""
        tinit, tfinal, total = self.config.tinit, self.config.tfinal, self.config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total - tfinal:
            return self.target_bgt, True
        progress = 1 - (step - tinit) / (total - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * progress**3 + self.target_bgt)
        return budget, step % self.config.deltaT == 0

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        for name, param in self._named(model):
            if param.grad is None:
                continue
            if name not in self.ipt:
                self.exp_avg_ipt[name] = torch.zeros_like(param)
                self.exp_avg_unc[name] = torch.zeros_like(param)
            self.ipt[name] = (param * param.grad).abs()
            self.exp_avg_ipt[name] = beta1 * self.exp_avg_ipt[name] + (1 - beta1) * self.ipt[name]
            self.exp_avg_unc[name] = beta2 * self.exp_avg_unc[name] + (1 - beta2) * (self.ipt[name] - self.exp_avg_ipt[name]).abs()

    def _score(self, name: str) -> torch.Tensor:
        return self.exp_avg_ipt[name] * self.exp_avg_unc[name]

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        params = dict(self._named(model))
        triplet_score: dict[str, torch.Tensor] = {}
        for template in self.triplets:
            a_name, b_name, e_name = (template % attr for attr in ("lora_A", "lora_B", "lora_E"))
            score_a = self._score(a_name).mean(dim=1, keepdim=True)  # (r, 1)
            score_b = self._score(b_name).mean(dim=0).view(-1, 1)  # (r, 1)
            vector = torch.cat([score_a, score_b], dim=1).sum(dim=1)
            triplet_score[e_name] = (self._score(e_name).view(-1) + vector).view(-1, 1)
        threshold = torch.kthvalue(torch.cat([s.view(-1) for s in triplet_score.values()]),
                                   k=self.init_bgt - budget)[0].item()
        pattern = {}
        for e_name, score in triplet_score.items():
            params[e_name].masked_fill_(score <= threshold, 0.0)
            pattern[e_name] = (~(score <= threshold)).view(-1).tolist()
        return pattern

    def update_and_allocate(self, model: nn.Module, global_step: int, force_mask: bool = False
                            ) -> tuple[int, dict[str, list[bool]] | None]:
        if global_step < self.config.total_step - self.config.tfinal:
            self.update_ipt(model)
        budget, mask_now = self.budget_schedule(global_step)
        return budget, (self.mask_to_budget(model, budget) if mask_now or force_mask else None)

    @torch.no_grad()
    def mask_using_rank_pattern(self, model: nn.Module, rank_pattern: dict[str, list[bool]]) -> None:
        truncated = self.adapter_name not in next(iter(rank_pattern))
        for name, param in self._named(model, "lora_E"):
            key = name.replace(f".{self.adapter_name}", "") if truncated else name
            keep = torch.tensor(rank_pattern[key], device=param.device).bool().view(-1, 1)
            param.masked_fill_(~keep, 0.0)
