"""The byte LM LightningModule: apps.common.CausalLMModule, plus the state carried between consecutive batches
(truncated BPTT across batches). Evaluation lives in apps.text.evaluate."""

from __future__ import annotations

import math

from apps.common import CausalLMModule
from ssm_core import ModelState, chunked_lm_loss

__all__ = ["TextLMModule"]

LN2 = math.log(2)


class TextLMModule(CausalLMModule):
    """Byte LM. Batches carrying ``reset`` (data.tbptt: true) continue the previous batch's rows, so the
    final state of one batch (detached: truncated BPTT) is the initial state of the next."""

    unit = "byte"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._carry: ModelState | None = None

    def training_step(self, batch, batch_idx):
        if "reset" not in batch:
            return super().training_step(batch, batch_idx)
        ids, labels = batch["input_ids"], batch["labels"]
        state = None if batch["reset"] or self._carry is None else self._carry
        chunk = self.hparams.chunk_len or ids.shape[1]
        out = chunked_lm_loss(self.model, ids, labels, chunk, state=state, detach_state=self.hparams.detach_state,
                              vocab_size=self.n_scored)
        self._carry = out.state.detach()
        self.log("train/bits_per_byte", out.loss / LN2, prog_bar=True, batch_size=ids.shape[0])
        return out.loss

    def on_train_epoch_start(self) -> None:
        self._carry = None
