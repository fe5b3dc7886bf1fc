"""One training run: a task, a model and a ``TrainSpec`` (the recipe; per-task defaults in ``SPECS``)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ssm_core import MambaLMHeadModel

from .model import STAGE_ACC, SyntheticModule, model_config
from .records import checkpoint_dir, write_json
from .tasks import TaskStream

__all__ = ["TrainSpec", "SPECS", "train"]


@dataclass
class TrainSpec:
    """The recipe of a run (CLI flags override the per-task defaults in SPECS). Copying's L is the noise
    length; sequences are L + 16. ``warmup_lengths``: a length curriculum before L: each stage runs until the
    held-out accuracy at its length reaches ``stage_acc`` (CPU budget: the last-token signal is sparse, and at
    L = 256 the plateau before the induction circuit forms is long; at L = 32 it forms in a few hundred steps).
    The last stage stops after two held-out checks at ``stop_acc``, but not before ``min_final_steps`` there.
    ``delta_l1`` / ``delta_log``: weights of penalties on the mean Δ / mean log Δ of the Mamba-1 and Mamba-2 layers.
    ``cosine``: the lr decays to 0 over max_steps after the warm-up (default constant). ``monitor_lengths``:
    held-out accuracy at these longer lengths is logged every ``monitor_every`` steps (never used to stop)."""

    L: int
    warmup_lengths: tuple[int, ...]
    min_final_steps: int  # at least this many steps at L, even once held-out accuracy is 100%
    batch: int
    max_steps: int
    lr: float
    eval_every: int
    weight_decay: float = 0.1
    delta_l1: float = 0.0
    delta_log: float = 0.0
    adam_eps: float = 1e-8
    stop_acc: float = 1.0
    stage_acc: float = STAGE_ACC
    cosine: bool = False
    monitor_lengths: tuple[int, ...] = ()
    monitor_every: int = 500

    def __post_init__(self):
        self.warmup_lengths, self.monitor_lengths = tuple(self.warmup_lengths), tuple(self.monitor_lengths)

    def override(self, **changes) -> TrainSpec:
        """A copy with these fields changed; None keeps the field (a CLI flag left unset)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


SPECS = {
    # the committed run: batch 8 and Adam without weight decay as in the paper, plus the Δ penalty (see
    # docs/paper_results.md); min_final_steps = max_steps: no early stop at 100% (margin grows after that)
    "induction": TrainSpec(L=256, warmup_lengths=(32,), min_final_steps=18_000, batch=8, max_steps=18_000, lr=1e-3,
                           eval_every=100, weight_decay=0.0, delta_l1=1e-2),
    "copying": TrainSpec(L=256, warmup_lengths=(64,), min_final_steps=0, batch=32, max_steps=3000, lr=3e-3,
                         eval_every=50),
}


def train(task: str, model: str, spec: TrainSpec | None = None, *, seed: int = 0, out: Path | None = None,
          init: Path | None = None, max_minutes: float | None = None, progress: bool = True) -> dict:
    """Train one model on one task with ``spec`` (default SPECS[task]); writes out/ (save_pretrained) +
    out/train.json, out/stage_L/ with the weights that passed each curriculum stage L, and out/best_L/ with the best
    held-out weights at the final length L. Returns the record.
    ``init``: continue from that checkpoint (weights only; its train.json is kept as "previous").
    ``max_minutes``: a wall-clock cap."""
    spec = spec or SPECS[task]
    lengths = [x for x in spec.warmup_lengths if x < spec.L] + [spec.L]
    out = Path(out) if out else checkpoint_dir(task, model)
    pl.seed_everything(seed, workers=True, verbose=False)
    stream = TaskStream(task, spec.batch, lengths[0], seed)
    module = SyntheticModule(model_config(model), task, lengths, stream, spec.lr, weight_decay=spec.weight_decay,
                             eval_every=spec.eval_every, warmup_steps=min(100, spec.max_steps // 10),
                             stop_acc=spec.stop_acc, min_final_steps=spec.min_final_steps, seed=seed,
                             monitor_lengths=spec.monitor_lengths, monitor_every=spec.monitor_every,
                             stage_acc=spec.stage_acc, adam_eps=spec.adam_eps, delta_l1=spec.delta_l1,
                             delta_log=spec.delta_log, cosine_steps=spec.max_steps if spec.cosine else None,
                             snapshot_dir=out)
    previous = None
    if init is not None:
        module.model.load_state_dict(MambaLMHeadModel.from_pretrained(init).state_dict())
        if (Path(init) / "train.json").exists():
            previous = json.loads((Path(init) / "train.json").read_text())
    loader = DataLoader(stream, batch_size=None, num_workers=0)
    trainer = pl.Trainer(
        max_steps=spec.max_steps, max_time={"minutes": max_minutes} if max_minutes else None,
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=1.0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, loader)
    wall = time.perf_counter() - t0
    module.model.save_pretrained(out)
    record = {
        "task": task, "model": model, "seed": seed, "L": spec.L, "curriculum": lengths, "reached_L": stream.L,
        "batch": spec.batch, "lr": spec.lr, "weight_decay": spec.weight_decay, "max_steps": spec.max_steps,
        "stage_acc": spec.stage_acc, "adam_eps": spec.adam_eps, "delta_l1": spec.delta_l1,
        "delta_log": spec.delta_log, "schedule": "cosine to 0" if spec.cosine else "constant",
        "steps": trainer.global_step, "min_final_steps": module.hparams.min_final_steps,
        "wall_s": round(wall, 1), "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in module.model.parameters()),
        "final_val_acc": module.curve[-1]["val_acc"] if module.curve else None, "curve": module.curve,
        "previous": previous,
    }
    write_json(out / "train.json", record)
    return record
