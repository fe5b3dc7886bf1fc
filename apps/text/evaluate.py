"""Exact bits/byte of a byte-level checkpoint on files:

    python -m apps.text.evaluate --files a.txt docs/ ...             # runs/text/pretrained, else the shipped model
    python -m apps.text.evaluate --ckpt DIR --files a.txt docs/ ...

Each file is one document read whole, in ``--chunk-len`` pieces with the state carried across
(apps.common.sequence_nll): exact for any length, memory of one piece. Folders are read recursively.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from apps.common import HeldOutEvaluation, sequence_nll
from apps.common.errors import run_cli
from apps.text.data import BOS, ByteCorpus, Consecutive, Doc, list_files
from apps.text.generate import default_model, load_model

__all__ = ["evaluate_files", "corpus_bits_per_byte", "window_bits_per_byte", "HeldOutBitsPerByte", "main"]

LN2 = math.log(2)


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


class HeldOutBitsPerByte(HeldOutEvaluation):
    """When fitting ends: exact bits/byte of the test split (whole files, state carried across chunks).
    ``max_bytes`` bounds the time it takes. A model with attention layers is scored on windows of the training
    length instead (its cache grows with the file and it was never trained beyond one window)."""

    def __init__(self, split: str = "test", max_bytes: int | None = 300_000, chunk_len: int = 8192):
        super().__init__(split)
        self.max_bytes, self.chunk_len = max_bytes, chunk_len

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        dm = trainer.datamodule
        docs = dm.split_docs()[self.split]
        if pl_module.model.config.attn_layer_idx:
            corpus = ByteCorpus(docs, dm.hparams.specials)
            bpb = window_bits_per_byte(pl_module.model, corpus, dm.hparams.seq_len, pl_module.n_scored)
            n, how = len(corpus) - 1, f"windows of {dm.hparams.seq_len}"
        else:
            bpb, n = corpus_bits_per_byte(pl_module.model, docs, dm.hparams.specials, self.chunk_len, self.max_bytes)
            how = "whole files, state carried"
        return {"metric": "bits/byte", "value": bpb, "tokens": n, "protocol": f"{n:,} bytes, {how}",
                "files": [str(d.path) for d in docs]}




def evaluate_files(ckpt: str | Path | torch.nn.Module | None, files: list[str | Path], pattern: str = "*",
                   chunk_len: int = 8192, max_bytes: int | None = None) -> dict:
    """{"files": {path: bits/byte}, "total": bits/byte over all scored bytes, "bytes": scored count}.

    ``ckpt``: a checkpoint path (None: the default model) or an already loaded model (scoring many groups)."""
    if chunk_len < 1:
        raise ValueError(f"--chunk-len must be at least 1, got {chunk_len}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"--max-bytes must be at least 1 (or left out: whole files), got {max_bytes}")
    model = ckpt if isinstance(ckpt, torch.nn.Module) else load_model(default_model(ckpt))
    specials = model.config.vocab_size > BOS  # a vocabulary with BOS/EOS: documents are framed by them
    paths = list_files(files, pattern)
    per_file, total_bits, total_n = {}, 0.0, 0
    for f in paths:
        if f.stat().st_size == 0 or (not specials and f.stat().st_size < 2):
            continue  # nothing to predict
        bpb, n = corpus_bits_per_byte(model, [Doc(f)], specials, chunk_len, max_bytes)
        per_file[str(f)] = bpb
        total_bits, total_n = total_bits + bpb * n, total_n + n
    if total_n == 0:
        raise ValueError(f"nothing to score in {[str(p) for p in paths]} (empty files)")
    return {"files": per_file, "total": total_bits / total_n, "bytes": total_n}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint (hiss save_pretrained, mamba_ssm, HF); default: runs/text/pretrained, "
                   "else the shipped apps/text/assets/byte_mamba")
    p.add_argument("--files", nargs="+", required=True, help="files and/or folders")
    p.add_argument("--pattern", default="*", help="file-name filter inside folders, e.g. '*.txt'")
    p.add_argument("--chunk-len", type=int, default=8192)
    p.add_argument("--max-bytes", type=int, help="score at most this many bytes per file")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = evaluate_files(a.ckpt, a.files, a.pattern, a.chunk_len, a.max_bytes)
    width = max(len(f) for f in result["files"])
    for f, bpb in result["files"].items():
        print(f"{f:<{width}}  {bpb:.4f} bits/byte")
    print(f"{'total':<{width}}  {result['total']:.4f} bits/byte over {result['bytes']:,} bytes "
          f"(perplexity per byte {math.pow(2, result['total']):.3f})")
    return result


if __name__ == "__main__":
    run_cli(main)
