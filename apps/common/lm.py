"""CausalLMModule: a LightningModule around ssm_core's MambaLMHeadModel (next-token cross-entropy).

Batches are dicts ``{"input_ids": (batch, L), "labels": (batch, L)}`` with labels already shifted
(labels[:, t] is the target of input_ids[:, t]; -100 is ignored). With ``chunk_len`` set, each batch is
read in pieces with the state carried across and activations recomputed in backward
(ssm_core.chunked_lm_loss): exact gradients at lengths a one-shot forward could not hold.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ssm_core import MambaConfig, MambaLMHeadModel, chunked_lm_loss

__all__ = ["CausalLMModule", "ExportPretrained", "param_groups", "warmup_cosine"]

LN2 = math.log(2)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
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


def warmup_cosine(step: int, warmup_steps: int, total_steps: int | None, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to ``min_ratio`` (constant if no total)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps or total_steps <= warmup_steps:
        return 1.0
    t = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class CausalLMModule(pl.LightningModule):
    """Next-token language model. ``unit`` names the token in logged metrics (bits_per_base, bits_per_byte).

    config: the ssm_core MambaConfig (YAML: ``model.config.d_model: 128`` ...); an all-attention config
    gives the Transformer baseline through the same module.
    vocab_size: how many logits are scored (the head is padded to a multiple of 8); default config.vocab_size.
    """

    unit = "token"

    def __init__(self, config: MambaConfig, lr: float = 2e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 chunk_len: int | None = None, detach_state: bool = False, vocab_size: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.model = MambaLMHeadModel(config)
        self.n_scored = vocab_size or config.vocab_size

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.model(input_ids, **kwargs)

    def lm_loss(self, batch: dict) -> tuple[torch.Tensor, int]:
        ids, labels = batch["input_ids"], batch["labels"]
        if self.hparams.chunk_len and ids.shape[1] > self.hparams.chunk_len:
            out = chunked_lm_loss(self.model, ids, labels, self.hparams.chunk_len,
                                  detach_state=self.hparams.detach_state, vocab_size=self.n_scored)
            return out.loss, out.n_tokens
        logits = self.model(ids).logits[..., : self.n_scored]
        n = int((labels != -100).sum())
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100), n

    def training_step(self, batch, batch_idx):
        loss, n = self.lm_loss(batch)
        self.log(f"train/bits_per_{self.unit}", loss / LN2, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        self.log("train/seq_len", float(batch["input_ids"].shape[1]), batch_size=1)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, n = self.lm_loss(batch)
        # weight by tokens so the epoch value is the exact bits per token of the validation set
        self.log(f"val/bits_per_{self.unit}", loss / LN2, prog_bar=True, batch_size=n, sync_dist=True)
        return loss

    def test_step(self, batch, batch_idx):
        loss, n = self.lm_loss(batch)
        self.log(f"test/bits_per_{self.unit}", loss / LN2, batch_size=n, sync_dist=True)
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(param_groups(self.model, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas))
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else None
        total = int(total) if total is not None and math.isfinite(total) else None
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, hp.warmup_steps, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportPretrained(pl.Callback):
    """Write the trained network in ssm_core's save_pretrained format (config.json + model.safetensors) when
    fitting ends, beside Lightning's .ckpt: the format evaluate, the demos and from_pretrained read.
    ``dirpath`` defaults to ``<log_dir>/pretrained``."""

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath

    def target(self, trainer: pl.Trainer) -> Path:
        if self.dirpath:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "pretrained"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking:
            out = self.target(trainer)
            os.makedirs(out.parent, exist_ok=True)
            pl_module.model.save_pretrained(out)
            print(f"pretrained model written to {out}")
