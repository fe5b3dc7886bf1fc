"""CausalLMModule: a LightningModule around ssm_core's MambaLMHeadModel (next-token cross-entropy).

Batches are dicts ``{"input_ids": (batch, L), "labels": (batch, L)}`` with labels already shifted
(labels[:, t] is the target of input_ids[:, t]; -100 is ignored). With ``chunk_len`` set, each batch is
read in pieces with the state carried across and activations recomputed in backward
(ssm_core.chunked_lm_loss): exact gradients at lengths a one-shot forward could not hold.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ssm_core import MambaConfig, MambaLMHeadModel, chunked_lm_loss

from .optim import adamw_warmup_cosine

__all__ = ["CausalLMModule"]

LN2 = math.log(2)


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
        return adamw_warmup_cosine(self, self.model, hp.lr, hp.weight_decay, hp.betas, hp.warmup_steps,
                                   hp.min_lr_ratio)
