"""The one optimizer recipe every app trains with: AdamW with mamba_ssm's no-decay groups, linear warm-up,
then cosine decay to a floor, stepped per optimizer step.

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model, **self.optim_kwargs())   # or pass the numbers
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch import nn

__all__ = ["param_groups", "cosine_at", "warmup_cosine", "adamw_warmup_cosine", "attached_trainer"]


def attached_trainer(module: pl.LightningModule) -> pl.Trainer | None:
    """The module's Trainer, or None when it runs outside one (Lightning raises instead of returning None)."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups the way mamba_ssm/nanoGPT do it: no decay on biases, norms, embeddings and on the
    parameters a mixer marks ``_no_weight_decay`` (A_log, D, dt bias)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or "embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_at(t: float, min_ratio: float) -> float:
    """Cosine from 1 at t = 0 to ``min_ratio`` at t >= 1."""
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, t))))


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to ``min_ratio`` (constant if no total)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    return cosine_at((step - warmup_steps) / (total_steps - warmup_steps), min_ratio)


def _annealing_budget(trainer: pl.Trainer | None):
    """The trainer's ``CPUTimeBudget(anneal=True)``, if it has one."""
    from .callbacks import CPUTimeBudget  # callbacks imports ssm_core; keep this module light

    if trainer is None:
        return None
    return next((c for c in trainer.callbacks if isinstance(c, CPUTimeBudget) and c.anneal), None)


def adamw_warmup_cosine(module: pl.LightningModule, model: nn.Module, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 0, min_lr_ratio: float = 0.1,
                        total_steps: int | None = None, eps: float = 1e-8) -> dict:
    """What ``configure_optimizers`` returns: AdamW over ``model``'s decay groups and a per-step warm-up +
    cosine schedule. ``total_steps`` defaults to the trainer's estimate (max_steps or epochs x batches); with
    no finite estimate (e.g. only max_time) the rate stays constant after warm-up. With a
    ``CPUTimeBudget(anneal=True)`` among the trainer's callbacks the cosine's progress is the larger of the share
    of steps done and the share of that CPU budget spent: on a machine fast enough for the steps it is the step
    schedule, on a slower one the schedule still ends when the budget does (with no step limit, the budget alone)."""
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps)
    trainer = attached_trainer(module)
    if total_steps is None:
        est = trainer.estimated_stepping_batches if trainer is not None else None
        total_steps = int(est) if est is not None and math.isfinite(est) else None
    budget = _annealing_budget(trainer)

    def schedule(s: int) -> float:
        if budget is None or s < warmup_steps:
            return warmup_cosine(s, warmup_steps, total_steps, min_lr_ratio)
        # the cosine follows whichever runs out first: the steps or the CPU budget
        steps_share = (s - warmup_steps) / (total_steps - warmup_steps) if (total_steps or 0) > warmup_steps else 0.0
        return cosine_at(max(steps_share, budget.fraction), min_lr_ratio)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
