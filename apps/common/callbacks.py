"""Lightning callbacks every app uses: export the trained network, a CPU-time budget, a held-out evaluation
when fitting ends (the app supplies the evaluation, the callback does the bookkeeping), a last checkpoint that
always advances (a crash loses at most one interval), no empty run folder after a failed start."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint

from ssm_core import atomic_write

__all__ = ["ExportPretrained", "CPUTimeBudget", "HeldOutEvaluation", "RemoveEmptyRunOnFailure", "LastCheckpoint",
           "log_dir"]


def log_dir(trainer: pl.Trainer) -> Path:
    """Where this run writes its files: the logger's version folder, else the trainer's root dir. Call it on every
    process: under DDP ``trainer.log_dir`` is a broadcast from rank 0, which waits for all ranks."""
    return Path(trainer.log_dir or trainer.default_root_dir)


class ExportPretrained(pl.Callback):
    """Write the trained network (``pl_module.model``) with its ``save_pretrained`` (config.json +
    model.safetensors [+ head.json]) when fitting ends, beside Lightning's .ckpt: the format evaluate, predict,
    the demos and ``from_pretrained`` read. ``dirpath`` defaults to ``<default_root_dir>/pretrained``, i.e.
    ``runs/<app>/pretrained`` with the apps' configs: every app's model is found in the same place."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def target(self, trainer: pl.Trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "pretrained"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = self.target(trainer)
        if trainer.is_global_zero and not trainer.sanity_checking:
            os.makedirs(out.parent, exist_ok=True)
            pl_module.model.save_pretrained(out)
            print(f"pretrained model written to {out}")


class CPUTimeBudget(pl.Callback):
    """Stop fitting once this process has used ``minutes`` of CPU time in training (time.process_time, all
    threads).

    A wall-clock limit (Trainer.max_time) on a shared machine also counts time spent waiting for the CPU or for
    a kernel build; CPU seconds are the budget two models can be given equally. Validation is not counted.

    ``anneal=True``: the budget also bounds the learning-rate schedule: ``adamw_warmup_cosine`` advances its cosine
    by the larger of the share of steps done and the share of this budget spent, so a run ends at the end of its
    schedule on any machine (a step count that fits the hour on one machine is otherwise cut mid-schedule, at a
    high learning rate, on a slower one); with no step limit the budget alone is the schedule, and a faster machine
    trains more steps in the same CPU time.
    """

    def __init__(self, minutes: float, anneal: bool = False):
        if minutes <= 0:
            raise ValueError(f"CPUTimeBudget: minutes must be > 0, got {minutes}")
        self.budget_s = 60.0 * minutes
        self.anneal = anneal
        self.used_s = 0.0
        self._t0: float | None = None

    @property
    def fraction(self) -> float:
        """The share of the budget spent so far, in [0, 1]."""
        return min(1.0, self.used_s / self.budget_s)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._t0 is not None:
            self.used_s += time.process_time() - self._t0
        if self.used_s >= self.budget_s:
            trainer.should_stop = True

    def state_dict(self) -> dict:  # a resumed run continues the same budget
        return {"used_s": self.used_s}

    def load_state_dict(self, state_dict: dict) -> None:
        self.used_s = float(state_dict.get("used_s", 0.0))


class HeldOutEvaluation(pl.Callback):
    """When fitting ends: score the held-out data once with the app's exact evaluation, print one line and write
    ``<log_dir>/heldout.json`` (atomically). Apps subclass it and implement ``evaluate``; the result is also
    kept on ``self.result`` for the caller (tests, comparison scripts).

    Runs on the main process only, and not after an interrupted fit (Ctrl-C): a partial run's number would be
    mistaken for the model's.
    """

    name = "held-out"

    def __init__(self, split: str = "test"):
        self.split = split
        self.result: dict | None = None

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Return ``{"metric": name, "value": float, ...}`` plus anything worth recording (counts, protocol)."""
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate()")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = log_dir(trainer) / "heldout.json"  # every rank (a collective under DDP)
        if not trainer.is_global_zero or trainer.interrupted or trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            result = {"split": self.split, "step": trainer.global_step, **self.evaluate(trainer, pl_module)}
        finally:
            pl_module.train(was_training)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
        self.result = result
        detail = result.get("protocol", "")
        print(f"held-out {result['metric']} ({self.split}{', ' + detail if detail else ''}): "
              f"{result['value']:.4f}  -> {out}")


class RemoveEmptyRunOnFailure(pl.Callback):
    """A run that fails before it wrote anything worth keeping (no checkpoint, no metrics) leaves no empty
    ``version_N`` folder behind (only Lightning's config.yaml / hparams.yaml would be in it). cli_main adds it to
    every app's trainer. Single-process runs only: under DDP the folder name is a collective."""

    KEEP = ("checkpoints", "metrics.csv", "heldout.json", "events.out.tfevents")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size != 1 or trainer.logger is None:
            return
        folder = Path(trainer.logger.log_dir) if getattr(trainer.logger, "log_dir", None) else None
        if folder is None or not folder.is_dir():
            return
        if any(f.name.startswith(self.KEEP) for f in folder.iterdir()):
            return
        shutil.rmtree(folder, ignore_errors=True)


class LastCheckpoint(Checkpoint):
    """Keep ``<log_dir>/checkpoints/last.ckpt`` current, so that a crash or ``kill -9`` at any moment loses at
    most one interval: every ``every_n_train_steps`` optimiser steps, every ``every_minutes`` minutes of wall
    time (either or both), and when training ends.

    Lightning's ``ModelCheckpoint(monitor=..., save_last=True)`` moves last.ckpt only when it saves (when
    validation runs, or improves), so a crash could cost several epochs; keep a monitored ModelCheckpoint,
    without ``save_last``, for the best model only. Each save is atomic: the checkpoint is written to a temp
    file beside last.ckpt (``ssm_core.atomic_write``, on rank 0; every rank takes part, saving is a collective)
    and renamed over it, so a kill during a save leaves the previous last.ckpt whole. The loggers are flushed
    first, so metrics.csv holds every step up to the checkpoint.

    Resume with ``--ckpt_path <log_dir>/checkpoints/last.ckpt``: model, optimiser, schedules, step and epoch
    counters and callback states come back, and with the apps' ``apps.common.data.ResumableLoader`` the data
    continues with the first batch the killed run had not trained on, so (at a fixed seed) the resumed loss
    curve continues the original's step for step. Lightning subclasses of ``Checkpoint`` run after the other
    callbacks' hooks, so the state saved includes this step's bookkeeping (e.g. ``CPUTimeBudget``).
    """

    def __init__(self, every_n_train_steps: int | None = 10, every_minutes: float | None = None,
                 dirpath: str | None = None, filename: str = "last.ckpt"):
        if every_n_train_steps is not None and (not isinstance(every_n_train_steps, int) or every_n_train_steps < 1):
            raise ValueError(f"LastCheckpoint: every_n_train_steps must be a positive int or null, "
                             f"got {every_n_train_steps!r}")
        if every_minutes is not None and not every_minutes > 0:
            raise ValueError(f"LastCheckpoint: every_minutes must be positive or null, got {every_minutes!r}")
        if not filename or os.sep in filename:
            raise ValueError(f"LastCheckpoint: filename must be a file name, got {filename!r}")
        self.every_n_train_steps, self.every_minutes = every_n_train_steps, every_minutes
        self.dirpath, self.filename = dirpath, filename
        self.path: Path | None = None  # where it writes, known once fitting starts
        self.saved_step = -1  # the global step of the last save
        self._last_time = time.monotonic()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":  # log_dir on every rank: under DDP it is a collective
            self.path = (Path(self.dirpath) if self.dirpath else log_dir(trainer) / "checkpoints") / self.filename
            self._last_time = time.monotonic()

    def _enabled(self, trainer: pl.Trainer) -> bool:
        return self.path is not None and not trainer.sanity_checking and not trainer.fast_dev_run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self._enabled(trainer) or step == self.saved_step:  # accumulating gradients, or saved at this step
            return
        due = bool(self.every_n_train_steps) and step % self.every_n_train_steps == 0
        if self.every_minutes is not None:
            due = due or time.monotonic() - self._last_time >= 60.0 * self.every_minutes
            due = bool(trainer.strategy.broadcast(due))  # every rank must agree: saving is a collective
        if due or self._last_batch(trainer):
            self.save(trainer)

    @staticmethod
    def _last_batch(trainer: pl.Trainer) -> bool:
        """Whether fitting stops after this batch: max_steps, the last batch of max_epochs, or a callback's
        should_stop (CPUTimeBudget, max_time). The final checkpoint is written here rather than in on_train_end:
        Lightning resumes a checkpoint written after an epoch's end-of-epoch hooks one epoch too far on."""
        if trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            return True
        max_epochs = trainer.max_epochs
        return (max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
                and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a stop decided after the last batch (EarlyStopping at validation end, say): save what there is
        if self._enabled(trainer) and trainer.global_step != self.saved_step:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint now (every rank must call it); returns its path."""
        assert self.path is not None, "LastCheckpoint.save before fitting started"
        for logger in trainer.loggers:
            logger.save()
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)

            def write(tmp: str) -> None:
                trainer.strategy.broadcast(tmp)
                trainer.save_checkpoint(tmp, weights_only=False)

            atomic_write(self.path, write)
        else:
            trainer.save_checkpoint(trainer.strategy.broadcast(None), weights_only=False)
        self.saved_step = trainer.global_step
        self._last_time = time.monotonic()
        return self.path

    def state_dict(self) -> dict:
        return {"saved_step": self.saved_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.saved_step = int(state_dict.get("saved_step", -1))
