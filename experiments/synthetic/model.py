"""The four models (2 layers, d_model 64, vocabulary 16) and the LightningModule that trains them: loss on the
last K positions, a length curriculum ended by held-out accuracy, optional penalties on the step size Δ."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from apps.common.baselines import transformer_like
from apps.common.optim import adamw_warmup_cosine
from ssm_core import MambaConfig, MambaLMHeadModel

from .evaluate import last_logits
from .mechanism import capture_delta, delta_selectivity
from .tasks import MAKE_BATCH, N_TARGETS, VOCAB, TaskStream

__all__ = ["MODELS", "STAGE_ACC", "model_config", "SyntheticModule", "accuracy"]

MODELS = ("mamba", "mamba2", "lti", "attention")
STAGE_ACC = 0.95  # default held-out accuracy that ends a curriculum stage (the last stage runs to stop_acc)


def model_config(model: str) -> MambaConfig:
    """2 layers, d_model 64, vocabulary 16 (the paper's synthetic-task size)."""
    base = MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB)
    if model == "mamba":
        return base
    if model == "lti":
        return MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB, ssm_cfg={"selective": False})
    if model == "mamba2":
        return MambaConfig(d_model=64, n_layer=2, vocab_size=VOCAB,
                           ssm_cfg={"layer": "Mamba2", "headdim": 32, "d_state": 64, "chunk_size": 64})
    if model == "attention":
        return transformer_like(base, num_heads=2)
    raise ValueError(f"unknown model {model!r}; choose from {MODELS}")


class SyntheticModule(pl.LightningModule):
    """Cross-entropy on the last K positions only (the targets), plus ``delta_l1`` x mean Δ and ``delta_log`` x
    mean log Δ of the Mamba-1 and Mamba-2 layers when set; AdamW,
    linear warm-up then constant lr (or a cosine to 0 over ``cosine_steps``); the run ends at max_steps or by
    early stopping (below). ``lengths``: the curriculum, the last one the training length."""

    def __init__(self, config: MambaConfig, task: str, lengths: list[int], stream: TaskStream, lr: float,
                 weight_decay: float = 0.1, warmup_steps: int = 100, eval_every: int = 50, n_val: int = 256,
                 stop_acc: float = 1.0, patience: int = 2, min_final_steps: int = 0, seed: int = 0,
                 monitor_lengths: tuple[int, ...] = (), monitor_every: int = 500, n_monitor: int = 64,
                 stage_acc: float = STAGE_ACC, adam_eps: float = 1e-8, delta_l1: float = 0.0,
                 delta_log: float = 0.0, cosine_steps: int | None = None, snapshot_dir: Path | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["config", "stream"])
        self.config, self.task, self.K, self.stream = config, task, N_TARGETS[task], stream
        self.model = MambaLMHeadModel(config)
        self.curve: list[dict] = []  # {"step", "L", "loss", "val_acc", "time_s"}
        self._best_final = -1.0  # best held-out accuracy at the final length (its weights go to best_L/)
        self._t0, self._loss = None, float("nan")
        self._set_stage(0)
        # held-out sets at lengths beyond L: extrapolation tracked during training (logged only: the code never
        # stops or selects on them; their seeds differ from the training stream's and the evaluation's)
        self.monitor = {}
        for L in monitor_lengths:
            gen = torch.Generator().manual_seed(seed + 2_000_003 + L)
            self.monitor[L] = MAKE_BATCH[task](n_monitor, L, gen)

    def _set_stage(self, i: int) -> None:
        self.stage, self._good, self._stage_start = i, 0, self.global_step
        L = self.stream.L = self.hparams.lengths[i]
        gen = torch.Generator().manual_seed(self.hparams.seed + 1_000_003 + L)  # held out: not the train stream
        self.val_ids, self.val_targets = MAKE_BATCH[self.task](self.hparams.n_val, L, gen)

    def forward(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > 8192 and not self.training:  # long held-out sets: read in pieces, bounded memory
            return last_logits(self.model, ids, self.K, 8192)
        return self.model(ids, num_last_tokens=self.K).logits[..., :VOCAB]

    def training_step(self, batch, batch_idx):
        ids, targets = batch
        hp = self.hparams
        if hp.delta_l1 or hp.delta_log:  # sparse selection: pay for every step size Δ, so only needed writes stay
            with capture_delta(self.model, mamba2=True) as deltas:
                logits = self(ids)
            penalty = 0.0
            if deltas and hp.delta_l1:  # no deltas in attention or LTI models (Mamba-2's: one per head)
                penalty = penalty + hp.delta_l1 * torch.stack([d.mean() for d, _ in deltas]).mean()
            if deltas and hp.delta_log:
                # log Δ: a constant push per unit of log Δ, however small Δ already is (L1's push fades with Δ);
                # below 1e-30 the clamp stops the push (and keeps log finite where Δ underflows to 0)
                log_delta = torch.stack([d.clamp_min(1e-30).log().mean() for d, _ in deltas]).mean()
                penalty = penalty + hp.delta_log * log_delta
        else:
            logits, penalty = self(ids), 0.0
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        self._loss = loss.item()
        self.log("loss", loss, prog_bar=True)
        return loss + penalty

    def on_train_start(self):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.global_step
        if step % self.hparams.eval_every and step != self.trainer.max_steps:
            return
        acc = accuracy(self, self.val_ids, self.val_targets, batch=64)
        self.curve.append({"step": step, "L": self.stream.L, "loss": self._loss, "val_acc": acc,
                           "time_s": round(time.perf_counter() - self._t0, 1)})
        self.log("val_acc", acc, prog_bar=True)
        extra = ""
        if self.monitor and (step % self.hparams.monitor_every == 0 or step == self.trainer.max_steps):
            self.curve[-1]["monitor"] = {str(L): accuracy(self, ids, t, batch=max(1, 2**16 // L))
                                         for L, (ids, t) in self.monitor.items()}
            extra = "  at " + " ".join(f"{L}: {a:.3f}" for L, a in self.curve[-1]["monitor"].items())
            with torch.no_grad():  # the selectivity behind extrapolation (Mamba-1 layers only)
                horizons = [r["horizon"] for r in delta_selectivity(self.model, self.task, self.stream.L, n=16)]
            if horizons:
                self.curve[-1]["horizon"] = horizons
                extra += "  Δ horizon " + " ".join(f"{h:.3g}" for h in horizons)
        print(f"step {step:>5}  L {self.stream.L:>5}  loss {self._loss:.3g}  held-out acc {acc:.4f}  "
              f"{self.curve[-1]['time_s']:.0f} s{extra}", flush=True)
        # next stage (or stop) once held-out accuracy has stayed at the target for `patience` checks in a row
        last = self.stage + 1 == len(self.hparams.lengths)
        if last and self.hparams.snapshot_dir is not None and acc > self._best_final:
            # the best held-out weights at the final length: a late lr spike must not cost a reached result
            self._best_final = acc
            self.model.save_pretrained(Path(self.hparams.snapshot_dir) / f"best_{self.stream.L}")
        self._good = self._good + 1 if acc >= (self.hparams.stop_acc if last else self.hparams.stage_acc) else 0
        if self._good >= self.hparams.patience:
            if not last:
                if self.hparams.snapshot_dir is not None:  # keep the weights that passed this stage: the next
                    # stage may end at the time cap in a worse state (lr spikes right after a length change)
                    self.model.save_pretrained(Path(self.hparams.snapshot_dir) / f"stage_{self.stream.L}")
                self._set_stage(self.stage + 1)
            elif step - self._stage_start >= self.hparams.min_final_steps:  # margin: sharper gates extrapolate
                self.trainer.should_stop = True

    def configure_optimizers(self):
        hp = self.hparams
        # total_steps 0: constant lr after the warm-up (the committed runs); cosine_steps: a cosine to 0
        return adamw_warmup_cosine(self, self.model, hp.lr, hp.weight_decay, betas=(0.9, 0.98),
                                   warmup_steps=hp.warmup_steps, min_lr_ratio=0.0,
                                   total_steps=hp.cosine_steps or 0, eps=hp.adam_eps)


@torch.no_grad()
def accuracy(module: SyntheticModule, ids: Tensor, targets: Tensor, batch: int) -> float:
    was = module.training
    module.eval()
    hits = sum(int((module(ids[i:i + batch]).argmax(-1) == targets[i:i + batch]).sum())
               for i in range(0, len(ids), batch))
    module.train(was)
    return hits / targets.numel()
