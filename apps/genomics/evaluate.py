"""Held-out bits per base of a trained DNA model, exactly, over sequences of any length.

    python -m apps.genomics.evaluate [--ckpt DIR] --fasta genome.fa.gz [--bed splits.bed]
                                     [--split test] [--chunk-len 65536]

``--ckpt`` is a save_pretrained directory (config.json + model.safetensors) or a Lightning ``.ckpt``; without it,
``runs/genomics/pretrained`` (your own training) or else the shipped multi-genome model.
Without ``--bed``, ``--split`` picks the held-out tail the training data module used (``--valid-frac``,
``--test-frac``); with neither, whole records are scored. Each interval is read from the FASTA in segments
and scored in ``chunk_len`` pieces with the recurrent state carried across (apps.common.sequence_nll), so
the number is the model's true log-likelihood of the whole interval, whatever its length, in constant memory.
bits/base averages over A/C/G/T targets only (N is skipped), each base predicted from all before it in
its interval (an interval's first base is context only).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn
from tqdm.auto import tqdm

from apps.common import HeldOutEvaluation, sequence_nll
from apps.common import load_model as common_load_model
from apps.common.errors import run_cli
from apps.genomics.data import (
    A_ID,
    MODEL_VOCAB_RANGE,
    T_ID,
    VOCAB_SIZE,
    FastaReader,
    Interval,
    holdout_intervals,
    read_bed,
)
from apps.genomics.model import DNALM, default_lm

__all__ = ["load_model", "bits_per_base", "HeldOutBitsPerBase", "main"]

SEGMENT = 1 << 22  # bases read from the FASTA at a time (32 MB of ids): constant memory for any interval


def load_model(ckpt: str | Path) -> nn.Module:
    """A causal DNA language model: a save_pretrained directory or a Lightning checkpoint of DNALM."""
    return common_load_model(ckpt, lightning_module=DNALM, vocab_range=MODEL_VOCAB_RANGE,
                             what="DNA language model")


@torch.no_grad()
def bits_per_base(model: nn.Module, fasta: FastaReader, intervals: list[Interval], chunk_len: int = 65536,
                  progress: bool = True, segment: int = SEGMENT) -> tuple[float, int]:
    """(bits per base, number of scored bases) over ``intervals`` of ``fasta``; see the module docstring."""
    total_nll, total_n = 0.0, 0
    todo = sum(max(len(iv) - 1, 0) for iv in intervals)
    with tqdm(total=todo, unit="base", unit_scale=True, desc="bits/base", disable=not progress) as bar:
        for iv in intervals:
            state = None
            # segments overlap by one base: sequence_nll's state ends just before a segment's final base,
            # which is where the next segment (starting at that base) must begin
            for s in range(iv.start, iv.end - 1, segment):
                ids = fasta.tokens(iv.chrom, s, min(s + segment + 1, iv.end))
                nll, state = sequence_nll(model, ids, chunk_len=chunk_len, vocab_size=VOCAB_SIZE, state=state,
                                          return_state=True, progress=bar)
                target = ids[1:]
                keep = (target >= A_ID) & (target <= T_ID)
                total_nll += float(nll[keep].double().sum())
                total_n += int(keep.sum())
    if total_n == 0:
        raise ValueError("no A/C/G/T bases to score in the given intervals")
    return total_nll / total_n / math.log(2), total_n


class HeldOutBitsPerBase(HeldOutEvaluation):
    """After training: exact bits/base of the data module's test split (whole intervals, state carried), read in
    pieces of the training length: the result is the same for any piece length (state / key-value cache
    carried), the memory of an attention baseline is not."""

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        dm = trainer.datamodule
        dm.setup()
        chunk = max(dm.hparams.seq_len, pl_module.hparams.get("chunk_len") or 0)
        bits, n = bits_per_base(pl_module.model, dm.fasta, dm.split(self.split), chunk_len=chunk,
                                progress=trainer.progress_bar_callback is not None)
        return {"metric": "bits/base", "value": bits, "bases": n,
                "protocol": f"{n:,} bases, whole intervals, exact chunked evaluation"}


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="save_pretrained directory or Lightning .ckpt (default: runs/genomics/pretrained, "
                                  "then the shipped multi-genome model)")
    p.add_argument("--fasta", required=True, help="FASTA (plain or bgzip .fa.gz)")
    p.add_argument("--bed", help="BED intervals (chrom start end [split])")
    p.add_argument("--split", choices=["train", "val", "valid", "test"], help="score only this split ('valid' = 'val')")
    p.add_argument("--valid-frac", type=float, default=0.05, help="held-out tail fractions when there is no BED")
    p.add_argument("--test-frac", type=float, default=0.05)
    p.add_argument("--chunk-len", type=int, default=65536, help="tokens per forward piece (memory, not result)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    if args.chunk_len < 1:
        raise ValueError(f"--chunk-len must be at least 1, got {args.chunk_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(default_lm(args.ckpt))
    fasta = FastaReader(args.fasta)
    if args.bed:
        intervals = read_bed(args.bed, fasta, default_split="test")
    elif args.split:
        intervals = holdout_intervals(fasta, args.valid_frac, args.test_frac)
    else:
        intervals = [Interval(name, 0, n, "test") for name, n in fasta.lengths.items()]
    if args.split:
        args.split = "val" if args.split == "valid" else args.split
        intervals = [iv for iv in intervals if iv.split == args.split]
        if not intervals:
            src = args.bed or f"{args.fasta} (held-out fractions --valid-frac {args.valid_frac}, --test-frac " \
                              f"{args.test_frac})"
            raise ValueError(f"{src}: no intervals in split {args.split!r}")
    bits, n = bits_per_base(model, fasta, intervals, chunk_len=args.chunk_len)
    what = f"split {args.split}" if args.split else "all given sequences"
    print(f"{args.fasta} ({what}, {len(intervals)} intervals, {n:,} bases): {bits:.4f} bits/base")
    return bits


if __name__ == "__main__":
    run_cli(main)
