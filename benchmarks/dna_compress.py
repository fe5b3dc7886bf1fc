"""Bits per base of a hiss DNA model beside classical compressors, on the same bases of whole genomes.

    python -m benchmarks.dna_compress                                   # bundled 300 kb E. coli sample
    python -m benchmarks.dna_compress --fasta datasets/genomes/ecoli_ec590.fa.gz datasets/genomes/ecoli_k12_w3110.fa.gz
    python -m benchmarks.dna_compress --ckpt runs/genomics/pretrained --max-order 20 --no-docs
    python -m benchmarks.dna_compress --fasta datasets/genomes/bacteria.fa.gz --bed datasets/genomes/bacteria.bed \
        --split test --max-bases 1000000 --contexts 1024 16384 262144     # held-out strains, context sweep

For each genome (FASTA, plain or gzip; every record, upper-cased), the bases that are not A/C/G/T (N runs,
IUPAC codes) are removed and counted, and every coder is charged for every remaining base:

* gzip -9, bzip2 -9, xz -9e: Python's gzip (zlib), bz2 and lzma modules (the libraries of the command-line
  tools, same settings) on the A/C/G/T text, one byte per base, no header or newlines; zstd --ultra -22: the
  ``zstd`` binary when installed (the row says "not installed" otherwise). bits/base = 8 x output bytes / bases.
* order-k Markov: an adaptive finite-context model, the code length of an arithmetic coder driven by it:
  sum over bases of -log2 p(x_t | previous k bases), p = (n(ctx, x) + a) / (n(ctx) + 4a) from the counts of
  everything before t (a = 1/2: Krichevsky-Trofimov; --alpha 1: Laplace), exact integer contexts (k <= 24),
  vectorised with numpy (counts-so-far by a stable sort, no Python loop over bases). The first k bases of the
  sequence have no full context and cost 2 bits each. Reported at the best k of 1 .. --max-order (the choice of
  k is not charged: a few bits).
* hiss: the causal DNA LM of ``--ckpt`` (default: the shipped apps/genomics/assets/dna_small), its exact
  log-likelihood (apps.genomics.evaluate.bits_per_base: each record read whole with the state carried across
  pieces) of the same cleaned records; each record's first base is charged 2 bits (the model predicts every
  base from the ones before it). Like the adaptive coders, this is a true code length: an arithmetic coder
  driven by the model's next-base distribution reaches it within a few bits. The model's parameters are
  not counted, as in the ML literature (the decoder ships the model once for all genomes); counting them would
  add the checkpoint's size (dna_small: 1.9 MB, about 15 Mbit: more than 3 bits per base of one 4.6 Mb genome).
  A checkpoint scores fairly only on genomes it was not trained on: ``--ckpt-note`` states what it saw.

The markdown table goes into the ``dna_compress`` block of docs/genomics.md (``benchmarks._doc.write_section``).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks._compressors import COMPRESSORS, compressed_sizes
from benchmarks._doc import publish

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "genomics.md"
SAMPLE = ROOT / "datasets" / "samples" / "ecoli_k12_w3110_300kb.fa.gz"
DEFAULT_CKPT = ROOT / "apps" / "genomics" / "assets" / "dna_small"
DEFAULT_NOTE = ("dna_small was trained on the bundled sample's train split (the first 270 kb of E. coli K-12 "
                "W3110): the sample row and the first 6% of the W3110 genome are not held out for it; EC590 is a "
                "strain it never saw")
MIX_GAMMA = 0.995  # chosen on the bacterial validation split (docs/genomics.md)
MAX_ORDER = 24  # 4^24 contexts x 4 symbols < 2^63: exact integer keys
_CODE = np.full(256, 255, dtype=np.uint8)  # byte -> 0..3 for A, C, G, T (either case); 255 = removed
for _i, _c in enumerate(b"ACGT"):
    _CODE[_c] = _CODE[_c + 32] = _i


# --- the bases ------------------------------------------------------------------------------------------------
@dataclass
class Genome:
    name: str
    records: list[tuple[str, np.ndarray]]  # (record name, codes 0..3 with non-ACGT removed)
    removed: int = 0  # non-ACGT characters removed (N, IUPAC)
    removed_runs: int = 0  # maximal runs of them

    @property
    def codes(self) -> np.ndarray:
        return np.concatenate([c for _, c in self.records]) if self.records else np.zeros(0, np.uint8)

    @property
    def n(self) -> int:
        return sum(len(c) for _, c in self.records)

    def text(self) -> bytes:
        """The uppercase A/C/G/T sequence, one byte per base (all records, in file order)."""
        return np.frombuffer(b"ACGT", dtype=np.uint8)[self.codes].tobytes()


def _clean(seq: bytes) -> tuple[np.ndarray, int, int]:
    """(2-bit codes of the A/C/G/T bases, non-ACGT characters removed, maximal runs of them)."""
    codes = _CODE[np.frombuffer(seq, dtype=np.uint8)]
    bad = codes == 255
    runs = int(bad[0]) + int((bad[1:] & ~bad[:-1]).sum()) if bad.any() else 0
    return codes[~bad], int(bad.sum()), runs


def read_split(fasta: str | os.PathLike, bed: str | os.PathLike, split: str = "test",
               max_bases: int | None = None, records: list[str] | None = None) -> list[Genome]:
    """One Genome per ``split`` interval of ``bed`` over ``fasta`` (a multi-genome set whose held-out strains are
    whole records), named by the record's accession, each cut to its first ``max_bases`` bases when given; with
    ``records``, only the intervals of those accessions are read (an unknown one raises ValueError)."""
    from apps.genomics.data import FastaReader, read_bed

    reader = FastaReader(fasta)
    intervals = [(iv, [f for f in iv.chrom.split("|") if f][-1])  # gi|123|ref|NC_1.1| -> NC_1.1
                 for iv in read_bed(bed, reader) if iv.split == split]
    if not intervals:
        raise ValueError(f"{bed}: no intervals in split {split!r}")
    if records:
        missing = sorted(set(records) - {name for _, name in intervals})
        if missing:
            raise ValueError(f"{missing} not in the {split!r} split of {bed} (it has {[n for _, n in intervals]})")
        intervals = [(iv, name) for iv, name in intervals if name in records]
    out = []
    for iv, accession in intervals:
        end = iv.end if max_bases is None else min(iv.end, iv.start + max_bases)
        codes, removed, runs = _clean(reader.fetch(iv.chrom, iv.start, end).encode())
        out.append(Genome(accession, [(f"{iv.chrom}:{iv.start}-{end}", codes)], removed, runs))
    return out


def read_genome(path: str | os.PathLike, name: str | None = None) -> Genome:
    """Every record of a FASTA (plain, gzip or bgzip) as 2-bit codes; non-ACGT characters removed and counted."""
    path = Path(path)
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    records, removed, runs = [], 0, 0
    cur_name, parts = None, []

    def flush():
        nonlocal removed, runs
        if cur_name is None:
            return
        codes, r, k = _clean(b"".join(parts))
        removed, runs = removed + r, runs + k
        records.append((cur_name, codes))

    with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
        for line in f:
            line = line.strip()
            if line.startswith(b">"):
                flush()
                cur_name, parts = line[1:].split(maxsplit=1)[0].decode() if line[1:].strip() else "", []
            elif line:
                if cur_name is None:
                    raise ValueError(f"{path}: sequence before the first '>' header")
                parts.append(line)
        flush()
    if not records:
        raise ValueError(f"{path}: no FASTA records")
    stem = path.name
    for suffix in (".gz", ".fa", ".fasta", ".fna"):
        stem = stem.removesuffix(suffix)
    return Genome(name or stem, records, removed, runs)


# --- adaptive order-k Markov model -------------------------------------------------------------------------------
def _count_before(keys: np.ndarray) -> np.ndarray:
    """For each position t, how many earlier positions hold the same key (vectorised: one stable sort)."""
    n = len(keys)
    order = np.argsort(keys, kind="stable")  # equal keys stay in time order
    sk = keys[order]
    start = np.ones(n, dtype=bool)
    start[1:] = sk[1:] != sk[:-1]
    idx = np.arange(n)
    first = np.maximum.accumulate(np.where(start, idx, 0))  # position (in sorted order) of each group's start
    out = np.empty(n, dtype=np.int64)
    out[order] = idx - first
    return out


def markov_log2p(codes: np.ndarray, k: int, alpha: float = 0.5) -> np.ndarray:
    """log2 p(x_t | the previous k bases) of every base of ``codes`` (0..3) under the adaptive order-k model with
    additive ``alpha`` (float64, one per base; the code length is minus their sum)."""
    if not 0 <= k <= MAX_ORDER:
        raise ValueError(f"order k must be in 0..{MAX_ORDER}, got {k}")
    n = len(codes)
    if n == 0:
        return np.zeros(0)
    x = codes.astype(np.int64)
    ctx = np.zeros(n, dtype=np.int64)
    for j in range(1, min(k, n) + 1):  # ctx_t = sum_j x[t-j] * 4^(j-1): the previous k bases, exactly
        ctx[j:] += x[:-j] << (2 * (j - 1))
    m = min(k, n)
    ctx[:m] = -1 - np.arange(m)  # the first k bases: a context of their own each (seen once: 2 bits)
    c_sym = _count_before(ctx * 4 + x)
    c_ctx = _count_before(ctx)
    return np.log2((c_sym + alpha) / (c_ctx + 4 * alpha))


def markov_bits(codes: np.ndarray, k: int, alpha: float = 0.5) -> float:
    """Total code length (bits) of ``codes`` (0..3) under the adaptive order-k model with additive ``alpha``."""
    return float(-markov_log2p(codes, k, alpha).sum())


def markov_sweep(codes: np.ndarray, max_order: int, alpha: float = 0.5) -> dict[int, float]:
    """bits/base of the adaptive order-k model for k = 1 .. max_order."""
    n = max(len(codes), 1)
    return {k: markov_bits(codes, k, alpha) / n for k in range(1, max_order + 1)}


# --- the hiss model ----------------------------------------------------------------------------------------------
def _model(ckpt_or_model):
    from apps.genomics.evaluate import load_model

    return load_model(ckpt_or_model) if isinstance(ckpt_or_model, (str, os.PathLike)) else ckpt_or_model


def model_log2p(ckpt: str | os.PathLike | object, genome: Genome, chunk_len: int = 65536, progress: bool = True
                ) -> np.ndarray:
    """log2 p of every cleaned base under the model (a checkpoint path or a loaded model), records in order:
    each record read whole with the state carried across pieces of ``chunk_len`` (the exact log-likelihood
    apps.genomics.evaluate.bits_per_base sums), its first base at log2(1/4) (nothing to predict it from)."""
    import torch
    from tqdm.auto import tqdm

    from apps.common.evaluate import sequence_nll
    from apps.genomics.data import A_ID, VOCAB_SIZE

    model = _model(ckpt)
    out = []
    with tqdm(total=genome.n, unit="base", unit_scale=True, desc="hiss", disable=not progress) as bar:
        for _, codes in genome.records:
            first = np.full(min(len(codes), 1), -2.0)
            if len(codes) >= 2:
                ids = torch.from_numpy(codes.astype(np.int64)) + A_ID
                with torch.no_grad():
                    nll = sequence_nll(model, ids, chunk_len=chunk_len, vocab_size=VOCAB_SIZE, progress=bar)
                out += [first, -nll.double().numpy() / math.log(2)]
            else:
                out.append(first)
            bar.update(len(first))  # sequence_nll counted the rest
    return np.concatenate(out) if out else np.zeros(0)


def model_bits(ckpt: str | os.PathLike | object, genome: Genome, chunk_len: int = 65536, progress: bool = True
               ) -> tuple[float, int]:
    """(total bits, bases) of the cleaned records under the model: minus the sum of ``model_log2p``."""
    return float(-model_log2p(ckpt, genome, chunk_len, progress).sum()), genome.n


# --- mixing the predictors -----------------------------------------------------------------------------------------
def mixture_bits(log2p: np.ndarray, gamma: float) -> float:
    """Code length (bits) of a Bayesian mixture with forgetting of M one-pass predictors, given each one's log2
    probability of every base that came, ``log2p`` (M, n):

        p_mix(x_t) = sum_i w_i,t p_i(x_t),   w_i,t ∝ prod_{s < t} p_i(x_s) ^ (gamma ^ (t - 1 - s))

    gamma = 1 is the Bayes mixture (within log2 M bits of the best predictor over the whole sequence); gamma < 1
    forgets, so the weight follows whichever predictor has been best lately: the model on ordinary sequence, a
    high-order context model inside a repeat (the "competitive prediction" of XM, GeCo and Jarvis, in its
    simplest form). Every p_i is a distribution over the next base given the bases before it, so p_mix is one
    too: an arithmetic coder driven by it reaches this code length. The log-weights are a first-order linear
    recurrence (log2 w_t = gamma log2 w_t-1 + log2 p_t-1), run by scipy's lfilter.
    """
    from scipy.signal import lfilter

    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    log2p = np.asarray(log2p, dtype=np.float64)
    if log2p.ndim != 2 or log2p.shape[1] == 0:
        raise ValueError(f"log2p must be (predictors, bases) with at least one base, got shape {log2p.shape}")
    evidence = lfilter([1.0], [1.0, -gamma], log2p, axis=1)[:, :-1]  # discounted log2-likelihood up to t
    logw = np.concatenate([np.zeros((len(log2p), 1)), evidence], axis=1)  # before the first base: uniform
    logw -= np.logaddexp2.reduce(logw, axis=0)
    return float(-np.logaddexp2.reduce(logw + log2p, axis=0).sum())


def context_bits(model, genome: Genome, context: int, batch_bases: int = 1 << 16, progress: bool = True) -> float:
    """Total bits of the cleaned records when the model sees at most ``context`` bases: each record cut into
    windows of ``context`` bases, every window scored from an empty state (its first base at 2 bits, so short
    windows pay 2 / context bits per base for it), windows batched ``batch_bases`` bases at a time."""
    import torch
    from tqdm.auto import tqdm

    from apps.common.evaluate import sequence_nll
    from apps.genomics.data import A_ID, VOCAB_SIZE

    if context < 2:
        raise ValueError(f"context must be at least 2 bases, got {context}")
    bits = 0.0
    with tqdm(total=genome.n, unit="base", unit_scale=True, desc=f"context {context:,}", disable=not progress) as bar:
        for _, codes in genome.records:
            ids = torch.from_numpy(codes.astype(np.int64)) + A_ID
            full = len(ids) // context
            pieces = [ids[: full * context].view(full, context)[s: s + max(1, batch_bases // context)]
                      for s in range(0, full, max(1, batch_bases // context))]
            if len(ids) > full * context:
                pieces.append(ids[full * context:][None])
            for w in pieces:
                bits += 2.0 * w.shape[0]
                if w.shape[1] >= 2:
                    nll = sequence_nll(model, w, chunk_len=min(context, 65536), vocab_size=VOCAB_SIZE)
                    bits += float(nll.double().sum()) / math.log(2)
                bar.update(w.numel())
    return bits


# --- the benchmark -----------------------------------------------------------------------------------------------
@dataclass
class Row:
    genome: str
    path: str
    bases: int
    removed: int
    removed_runs: int
    records: int
    compressors: dict[str, float | None] = field(default_factory=dict)  # bits/base (None: not installed)
    markov: dict[int, float] = field(default_factory=dict)  # k -> bits/base
    model: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    contexts: dict[int, float] = field(default_factory=dict)  # evaluation context (bases) -> hiss bits/base
    mix: dict[str, float] = field(default_factory=dict)  # MIX_MARKOV / MIX_HISS -> bits/base (mixture_bits)

    @property
    def best_k(self) -> int:
        return min(self.markov, key=self.markov.get)


MIX_MARKOV, MIX_HISS = "order-k mix", "hiss + order-k mix"


def run_genome(path: str | os.PathLike, ckpt, max_order: int, alpha: float, chunk_len: int,
               progress: bool = True, contexts: tuple[int, ...] = (), mix_gamma: float | None = None) -> Row:
    """One genome file: compressors, the Markov sweep and (``ckpt``: a path or a loaded model) the model."""
    return score_genome(read_genome(path), str(path), ckpt, max_order, alpha, chunk_len, progress, contexts,
                        mix_gamma)


def score_genome(g: Genome, path: str, ckpt, max_order: int, alpha: float, chunk_len: int, progress: bool = True,
                 contexts: tuple[int, ...] = (), mix_gamma: float | None = None) -> Row:
    """Every coder on the cleaned bases of ``g``; ``mix_gamma``: also the mixtures (``mixture_bits``) of the
    orders 1..max_order, without and with the model."""
    if g.n == 0:
        raise ValueError(f"{path}: no A/C/G/T bases")
    row = Row(g.name, path, g.n, g.removed, g.removed_runs, len(g.records))
    t = time.perf_counter()
    for name, size in compressed_sizes(g.text()).items():
        row.compressors[name] = None if size is None else 8.0 * size / g.n
    row.seconds["compressors"] = time.perf_counter() - t
    t = time.perf_counter()
    orders = np.stack([markov_log2p(g.codes, k, alpha) for k in range(1, max_order + 1)])  # (max_order, n)
    row.markov = {k: float(-orders[k - 1].sum()) / g.n for k in range(1, max_order + 1)}
    if mix_gamma is not None:
        row.mix[MIX_MARKOV] = mixture_bits(orders, mix_gamma) / g.n
    row.seconds["markov"] = time.perf_counter() - t
    if ckpt is not None:
        t = time.perf_counter()
        model = _model(ckpt)  # a path is loaded once for the record and every context of the sweep
        hiss = model_log2p(model, g, chunk_len, progress)
        row.model = float(-hiss.sum()) / g.n
        if mix_gamma is not None:
            row.mix[MIX_HISS] = mixture_bits(np.concatenate([hiss[None], orders]), mix_gamma) / g.n
        row.seconds["model"] = time.perf_counter() - t
        for c in contexts:
            row.contexts[c] = context_bits(model, g, c, progress=progress) / g.n
    return row


def _fmt(x: float | None, best: float) -> str:
    if x is None:
        return "not installed"
    s = f"{x:.4f}"
    return f"**{s}**" if abs(x - best) < 5e-5 else s


def _classical(r: Row) -> float:
    """The best classical code length of a row: the compressors, the best order and the mixture of the orders."""
    return min(v for v in [*r.compressors.values(), r.markov[r.best_k], r.mix.get(MIX_MARKOV)] if v is not None)


def render(rows: list[Row], ckpt: str | None, note: str, alpha: float, max_order: int, threads: int,
           scope: str = "of the whole genome (all records; non-ACGT characters removed first and counted)",
           mix_gamma: float | None = None) -> str:
    shown = ckpt and (os.path.relpath(ckpt, ROOT) if Path(ckpt).is_absolute() else ckpt)
    ckpt_txt = f"`{shown}`" if ckpt else "none (--no-model)"
    est = "Krichevsky-Trofimov (a = 1/2)" if alpha == 0.5 else ("Laplace (a = 1)" if alpha == 1 else f"a = {alpha:g}")
    mixed = any(r.mix for r in rows)
    mix_txt = (f" Mixes: a Bayesian mixture with forgetting (gamma = {mix_gamma:g}) of the order-1..{max_order} models "
               "(\"order-k mix\"), and of those and the hiss model (\"hiss + order-k mix\"): each base coded with the "
               "weighted sum of the predictors' probabilities, weights from how well each predicted the bases before "
               "it (`mixture_bits`; a one-pass code length like the others).") if mixed else ""
    out = [f"**Bits per base beside classical compressors**, measured {datetime.date.today()} "
           f"(`python -m benchmarks.dna_compress`, {threads} torch thread(s)). "
           f"Every coder is charged for every A/C/G/T base {scope}; bits/base = total code length / bases. "
           "Compressors: 8 x output bytes of the one-byte-per-base text. Order-k Markov: adaptive code length with "
           f"{est} counts, best k of 1..{max_order}. hiss: {ckpt_txt}, exact log-likelihood of each whole record "
           "(state carried), first base of a record at 2 bits; parameters not counted (as in the ML literature; "
           f"see the module docstring).{mix_txt} {note}.", "",
           "| genome | bases (non-ACGT removed) | gzip -9 | bzip2 -9 | xz -9e | zstd --ultra -22 | order-k Markov (k) "
           + (f"| {MIX_MARKOV} | hiss | {MIX_HISS} |" if mixed else "| hiss |"),
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |" + " ---: |" * (1 + 2 * mixed)]
    for r in rows:
        vals = [v for v in [*r.compressors.values(), r.markov[r.best_k], r.model, *r.mix.values()] if v is not None]
        best = min(vals)
        comp = " | ".join(_fmt(r.compressors.get(c), best) for c in COMPRESSORS)
        model = "not run" if r.model is None else _fmt(r.model, best)
        mix_m = f" | {_fmt(r.mix.get(MIX_MARKOV), best)}" if mixed else ""
        mix_h = f" | {_fmt(r.mix[MIX_HISS], best) if MIX_HISS in r.mix else 'not run'}" if mixed else ""
        removed = f"{r.removed:,} in {r.removed_runs:,} runs" if r.removed else "0"
        out.append(f"| {r.genome} | {r.bases:,} ({removed}) | {comp} | {_fmt(r.markov[r.best_k], best)} "
                   f"({r.best_k}){mix_m} | {model}{mix_h} |")
    out += ["", "Order-k Markov bits/base by k (adaptive, one pass):", ""]
    for r in rows:
        ks = " · ".join(f"{k}: {v:.3f}" for k, v in r.markov.items())
        out.append(f"- {r.genome}: {ks}")
    judged = [("hiss", lambda r: r.model)] + ([(MIX_HISS, lambda r: r.mix.get(MIX_HISS))] if mixed else [])
    for name, value in judged:
        verdicts = []
        for r in rows:
            v, classical = value(r), _classical(r)
            verdicts.append(f"{r.genome}: not run" if v is None else f"{r.genome}: {'yes' if v < classical else 'no'} "
                            f"({name} {v:.4f}, best classical {classical:.4f}, {v - classical:+.4f})")
        out += ["", f"{name} below every classical coder{' (the order-k mix included)' if mixed else ''}? "
                + "; ".join(verdicts) + "."]
    swept = sorted({c for r in rows for c in r.contexts})
    if swept:
        out += ["", "**Evaluation context** (`--contexts`): hiss bits/base when the model sees at most C bases (each "
                "record cut into windows of C bases, every window from an empty state, its first base at 2 bits); "
                "the last column is the whole record with the state carried (the table above).", "",
                "| genome | " + " | ".join(f"C = {c:,}" for c in swept) + " | whole record |",
                "| --- | " + " | ".join("---:" for _ in swept) + " | ---: |"]
        for r in rows:
            if r.contexts:
                cells = " | ".join("" if c not in r.contexts else f"{r.contexts[c]:.4f}" for c in swept)
                out.append(f"| {r.genome} | {cells} | {'' if r.model is None else f'{r.model:.4f}'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fasta", nargs="+", default=[str(SAMPLE)], help="genomes (FASTA, plain or gzip)")
    p.add_argument("--bed", help="with one --fasta: score its --split intervals (held-out strains), one row each")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the --bed split to score")
    p.add_argument("--max-bases", type=int, default=None, help="with --bed: the first N bases of each interval")
    p.add_argument("--contexts", type=int, nargs="*", default=[],
                   help="also score hiss with at most this many bases of context (a sweep, e.g. 1024 16384 262144)")
    p.add_argument("--sweep-genomes", nargs="*", default=None, help="run the --contexts sweep on these rows only")
    p.add_argument("--records", nargs="+", default=None, help="with --bed: score only these records of the split")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="hiss DNA LM (save_pretrained dir or .ckpt)")
    p.add_argument("--ckpt-note", default=None, help="what the checkpoint was trained on (printed in the doc)")
    p.add_argument("--no-model", action="store_true", help="compressors and Markov model only")
    p.add_argument("--max-order", type=int, default=16, help=f"largest Markov order (<= {MAX_ORDER})")
    p.add_argument("--alpha", type=float, default=0.5, help="additive count: 0.5 Krichevsky-Trofimov, 1 Laplace")
    p.add_argument("--mix-gamma", type=float, default=MIX_GAMMA,
                   help="forgetting of the predictor mixtures (mixture_bits; 1: no forgetting)")
    p.add_argument("--no-mix", action="store_true", help="without the mixtures of the orders (and the model)")
    p.add_argument("--chunk-len", type=int, default=65536, help="model piece length (memory, not result)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the model")
    p.add_argument("--doc", default=str(DOC), help="markdown file whose dna_compress block is replaced")
    p.add_argument("--block", default="dna_compress", help="the marked block of --doc to replace")
    p.add_argument("--no-docs", action="store_true", help="print only")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--from-json", metavar="PATH", help="render (and write the doc) from rows saved by --json")
    args = p.parse_args(argv)
    if not 1 <= args.max_order <= MAX_ORDER:
        p.error(f"--max-order must be in 1..{MAX_ORDER}")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bed and len(args.fasta) != 1:
        p.error("--bed reads the intervals of one --fasta")
    if args.max_bases is not None and not args.bed:
        p.error("--max-bases applies to --bed intervals")
    if args.records and not args.bed:
        p.error("--records names records of the --bed split")
    ckpt = None if args.no_model else args.ckpt
    mix_gamma = None if args.no_mix else args.mix_gamma
    if mix_gamma is not None and not 0 < mix_gamma <= 1:
        p.error(f"--mix-gamma must be in (0, 1], got {mix_gamma}")
    note = args.ckpt_note or (DEFAULT_NOTE if ckpt and Path(ckpt).resolve() == DEFAULT_CKPT.resolve() else
                              "The checkpoint's training data: not stated (--ckpt-note)")
    rows = []
    if args.from_json:
        rows = [Row(**{**d, "markov": {int(k): v for k, v in d["markov"].items()},
                       "contexts": {int(k): v for k, v in d.get("contexts", {}).items()}, "mix": d.get("mix", {})})
                for d in json.loads(Path(args.from_json).read_text())]
    model = None if ckpt is None or args.from_json else _model(ckpt)  # loaded once for every genome
    if args.from_json:
        genomes = []
    elif args.bed:
        try:
            split = read_split(args.fasta[0], args.bed, args.split, args.max_bases, args.records)
        except ValueError as e:
            p.error(f"--records {e}" if args.records else str(e))
        genomes = [(g, f"{args.fasta[0]}:{g.records[0][0]}") for g in split]
    else:
        genomes = [(read_genome(path), str(path)) for path in args.fasta]
    for g, where in genomes:
        sweep = args.sweep_genomes is None or g.name in args.sweep_genomes
        r = score_genome(g, where, model, args.max_order, args.alpha, args.chunk_len,
                         contexts=tuple(args.contexts) if sweep else (), mix_gamma=mix_gamma)
        rows.append(r)
        comp = "  ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}" for k, v in r.compressors.items())
        hiss = "" if r.model is None else f"  hiss {r.model:.4f}"
        hiss += "".join(f"  {k} {v:.4f}" for k, v in r.mix.items())
        print(f"{r.genome}: {r.bases:,} bases ({r.removed:,} removed)  {comp}  "
              f"Markov k={r.best_k} {r.markov[r.best_k]:.4f}{hiss}  "
              f"({', '.join(f'{k} {v:.0f} s' for k, v in r.seconds.items())})", flush=True)
    scope = None
    if args.bed:
        cut = f"of the first {args.max_bases:,} bases of" if args.max_bases else "of the whole of"
        which = f"the `{args.split}` interval of {', '.join(args.records)} in" if args.records else \
            f"each `{args.split}` interval of"
        scope = f"{cut} {which} `{args.bed}` (held-out records; non-ACGT characters removed first and counted)"
    block = render(rows, ckpt, note, args.alpha, args.max_order, torch.get_num_threads(),
                   **({"scope": scope} if scope else {}), mix_gamma=mix_gamma)
    publish(block, args.block, args.doc, rows, args.json, not args.no_docs)
    return rows


if __name__ == "__main__":
    main()
    sys.exit(0)
