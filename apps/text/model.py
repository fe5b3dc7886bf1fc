"""The byte LM LightningModule: apps.common.CausalLMModule, plus the state carried between consecutive batches
(truncated BPTT across batches) and an exact held-out bits/byte report when fitting ends."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from apps.common import CausalLMModule
from apps.common.evaluate import sequence_nll
from ssm_core import ModelState, chunked_lm_loss

from .data import ByteCorpus, Consecutive, Doc

__all__ = ["TextLMModule", "HeldOutBits", "corpus_bits_per_byte", "window_bits_per_byte"]

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


@torch.no_grad()
def corpus_bits_per_byte(model, docs: list[Doc], specials: bool, chunk_len: int = 8192,
                         max_bytes: int | None = None) -> tuple[float, int]:
    """Exact bits per byte over whole documents, each read in ``chunk_len`` pieces with the state carried
    (apps.common.sequence_nll). With specials, BOS is context and every byte is scored (EOS too is
    scored and counted); without, a document's first byte is context only. Returns (bits/byte, tokens scored).
    ``max_bytes`` stops after that many scored tokens (a prefix of the split, for quick reports)."""
    corpus = ByteCorpus(docs, specials)
    vocab = 259 if specials else 256
    total, n = 0.0, 0
    for i in range(len(docs)):
        tokens = corpus.doc_tokens(i)
        if max_bytes is not None:
            tokens = tokens[: max_bytes - n + 1]
        if len(tokens) < 2:
            continue
        nll = sequence_nll(model, tokens, chunk_len=chunk_len, vocab_size=vocab)
        total, n = total + float(nll.double().sum()), n + nll.numel()
        if max_bytes is not None and n >= max_bytes:
            break
    if n == 0:
        raise ValueError("corpus_bits_per_byte: nothing to score (empty documents)")
    return total / n / LN2, n


@torch.no_grad()
def window_bits_per_byte(model, corpus: ByteCorpus, seq_len: int, n_scored: int, batch: int = 8) -> float:
    """Bits per byte over non-overlapping ``seq_len`` windows of the stream, each window read from scratch
    (the protocol a fixed-context Transformer is scored with)."""
    was_training = model.training
    model.eval()
    ds = Consecutive(corpus, seq_len)
    total, n = 0.0, 0
    for s in range(0, len(ds), batch):
        items = [ds[i] for i in range(s, min(s + batch, len(ds)))]
        x = torch.stack([it["input_ids"] for it in items])
        y = torch.stack([it["labels"] for it in items])
        logits = model(x).logits[..., :n_scored].float()
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum"))
        n += int((y != -100).sum())
    model.train(was_training)
    return total / n / LN2


class HeldOutBits(pl.Callback):
    """When fitting ends: exact bits/byte of the test split (whole files, state carried across chunks),
    printed and written to ``<log_dir>/heldout.json``. ``max_bytes`` bounds the time it takes. A model with
    attention layers is scored on windows of the training length instead (its cache grows with the file
    and it was never trained beyond one window)."""

    def __init__(self, split: str = "test", max_bytes: int | None = 300_000, chunk_len: int = 8192):
        self.split, self.max_bytes, self.chunk_len = split, max_bytes, chunk_len

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        if not trainer.is_global_zero or dm is None:
            return
        docs = dm.split_docs()[self.split]
        if pl_module.model.config.attn_layer_idx:
            corpus = ByteCorpus(docs, dm.hparams.specials)
            bpb = window_bits_per_byte(pl_module.model, corpus, dm.hparams.seq_len, pl_module.n_scored)
            n, how = len(corpus) - 1, f"windows of {dm.hparams.seq_len}"
        else:
            bpb, n = corpus_bits_per_byte(pl_module.model, docs, dm.hparams.specials, self.chunk_len, self.max_bytes)
            how = "whole files, state carried"
        result = {"split": self.split, "bits_per_byte": bpb, "tokens": n, "protocol": how,
                  "files": [str(d.path) for d in docs], "step": trainer.global_step}
        out = Path(trainer.log_dir or trainer.default_root_dir) / "heldout.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"held-out ({self.split}, {n:,} bytes, {how}): {bpb:.4f} bits/byte  -> {out}")
