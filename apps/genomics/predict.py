"""Inference with genomics checkpoints: per-base log-likelihood, variant effect scores, embeddings, generation.

    python -m apps.genomics.predict loglik   [--ckpt DIR] --fasta seqs.fa --out ll.tsv   # default: the shipped LM
    python -m apps.genomics.predict variants --ckpt DIR --fasta genome.fa --variants calls.txt --out scores.tsv
    python -m apps.genomics.predict embed    --ckpt DIR --fasta seqs.fa --out emb.npy [--per-base]
    python -m apps.genomics.predict generate --ckpt DIR --prompt ACGTTGCA --n 200 --seed 0

A checkpoint is a save_pretrained directory, read by apps.common.load_model: a causal next-base LM (model.DNALM /
MambaLMHeadModel: config.json + model.safetensors) or a model.DNAModel (adds head.json: masked LM or classifier);
a kuleshov-group Caduceus folder (Hugging Face layout) loads as a masked-LM DNAModel (apps.genomics.caduceus).
Causal models give exact log p(x_t | x_<t) (apps.common.sequence_nll, read in pieces with the state carried);
masked LMs give the pseudo-log-likelihood log p(x_t | x without t) (one masked copy per base).
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from apps.common import load_model as common_load_model
from apps.common import pool, sequence_nll
from apps.common.errors import run_cli
from apps.genomics.caduceus import is_caduceus_dir, load_caduceus
from apps.genomics.data import A_ID, MASK_ID, MODEL_VOCAB_RANGE, T_ID, VOCAB_SIZE, decode, encode
from apps.genomics.model import DNAModel, default_lm
from ssm_core import MambaLMHeadModel, atomic_write

__all__ = ["load_model", "model_kind", "per_base_loglik", "Variant", "read_variants", "score_variants",
           "embed", "save_embeddings", "generate_dna", "read_fasta_records", "SequenceDict"]

Model = MambaLMHeadModel | DNAModel


def load_model(path: str | os.PathLike) -> Model:
    """A save_pretrained directory -> MambaLMHeadModel (causal LM) or DNAModel (has head.json, or a Caduceus
    folder: apps.genomics.caduceus), in eval mode."""
    if is_caduceus_dir(path):
        return load_caduceus(path)
    return common_load_model(path, head_model=DNAModel, vocab_range=MODEL_VOCAB_RANGE, what="DNA model")


def model_kind(model: Model) -> str:
    """"causal" (next-base LM), "mlm", "sequence" or "token" (classifiers)."""
    return model.head_config.task if isinstance(model, DNAModel) else "causal"


# --- log-likelihood ------------------------------------------------------------------------------------
@torch.no_grad()
def per_base_loglik(model: Model, seq: str | Tensor, chunk_len: int = 8192, batch: int = 64,
                    max_pll_len: int = 20_000) -> np.ndarray:
    """Natural-log likelihood of every base: (L,) float64.

    Causal LM: log p(x_t | x_<t); position 0 has no context and is NaN. Masked LM: pseudo-log-likelihood
    log p(x_t | everything else), one masked copy per base (L forward passes, ``batch`` at a time; refused above
    ``max_pll_len`` bases). Classifiers have no likelihood: ValueError.
    """
    ids = encode(seq) if isinstance(seq, str) else seq.long()
    kind = model_kind(model)
    if kind == "causal":
        nll = sequence_nll(model, ids, chunk_len=chunk_len, vocab_size=VOCAB_SIZE)
        return np.concatenate([[np.nan], -nll.double().numpy()])
    if kind != "mlm":
        raise ValueError(f"a {kind!r} classifier has no per-base likelihood; use a causal or masked LM checkpoint")
    L = len(ids)
    if L > max_pll_len:
        raise ValueError(f"pseudo-log-likelihood needs one pass per base; {L:,} bases is over {max_pll_len:,}")
    was_training = model.training
    model.eval()
    out = np.empty(L)
    try:
        for s in range(0, L, batch):
            pos = torch.arange(s, min(s + batch, L))
            x = ids.repeat(len(pos), 1)
            x[torch.arange(len(pos)), pos] = MASK_ID
            logp = model(x)[torch.arange(len(pos)), pos, :VOCAB_SIZE].float().log_softmax(-1)
            out[s: s + len(pos)] = logp[torch.arange(len(pos)), ids[pos]].double().numpy()
    finally:
        model.train(was_training)
    return out


# --- variant effect scoring --------------------------------------------------------------------------
class Genome(Protocol):
    def length(self, name: str) -> int: ...
    def fetch(self, name: str, start: int = 0, end: int | None = None) -> str: ...


class SequenceDict:
    """In-memory sequences with FastaReader's ``length``/``fetch`` (for pasted FASTA in the demo)."""

    def __init__(self, records: dict[str, str]):
        self.records = records

    def length(self, name: str) -> int:
        if name not in self.records:
            raise KeyError(f"no sequence named {name!r} (have: {', '.join(list(self.records)[:10])})")
        return len(self.records[name])

    def fetch(self, name: str, start: int = 0, end: int | None = None) -> str:
        n = self.length(name)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"interval {name}:{start}-{end} is outside the sequence (length {n:,})")
        return self.records[name][start:end]


@dataclass
class Variant:
    chrom: str
    pos: int  # 1-based, VCF convention
    ref: str
    alt: str
    where: str  # "file:line" for error messages


_ALLELE = re.compile(r"^[ACGTNacgtn]+$")


def read_variants(text_or_path: str | os.PathLike, name: str | None = None) -> list[Variant]:
    """Variants from a VCF or a plain list with one ``chrom pos ref alt`` per line (whitespace-separated,
    1-based pos, ``#`` comments). VCF is recognised by a ``#CHROM`` / ``##fileformat`` header and read from its
    CHROM, POS, REF, ALT columns; comma-separated ALTs give one variant each. Errors name the line."""
    if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                         and Path(text_or_path).is_file()):
        src = str(text_or_path) if name is None else name
        text = Path(text_or_path).read_text()
    else:
        src, text = name or "variants", str(text_or_path)
    vcf = bool(re.search(r"^(##fileformat=VCF|#CHROM)", text, re.M))
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        cols = line.split("\t") if vcf else line.split()
        where = f"{src}:{n}"
        if vcf:
            if len(cols) < 5:
                raise ValueError(f"{where}: a VCF line needs 5+ columns (CHROM POS ID REF ALT), got {len(cols)}")
            chrom, pos, ref, alts = cols[0], cols[1], cols[3], cols[4]
        else:
            if len(cols) != 4:
                raise ValueError(f"{where}: expected 4 columns 'chrom pos ref alt', got {len(cols)}: {line!r}")
            chrom, pos, ref, alts = cols
        try:
            p = int(pos)
        except ValueError:
            raise ValueError(f"{where}: position {pos!r} is not an integer") from None
        if p < 1:
            raise ValueError(f"{where}: position {p} must be >= 1 (1-based)")
        for alt in alts.split(","):
            for what, allele in (("ref", ref), ("alt", alt)):
                if not _ALLELE.match(allele):
                    raise ValueError(f"{where}: {what} allele {allele!r} must be bases A/C/G/T/N "
                                     "(symbolic alleles such as <DEL> are not scored)")
            out.append(Variant(chrom, p, ref.upper(), alt.upper(), where))
    return out


@torch.no_grad()
def _sum_loglik(model: Model, seqs: list[str]) -> list[float]:
    return [float(np.nansum(per_base_loglik(model, s))) for s in seqs]


@torch.no_grad()
def score_variants(model: Model, genome: Genome, variants: list[Variant], flank: int = 256) -> list[dict]:
    """Log-likelihood ratio log P(alt) - log P(ref) (nats) per variant; > 0: the model prefers the alt allele.

    Causal LM: total log-likelihood of the window [pos - flank, pos + len(ref) + flank) with the ref vs the alt
    allele (indels allowed; bases before the variant cancel exactly). Masked LM: masked marginal at the position,
    log p(alt) - log p(ref) with the base masked in the reference context (SNVs only).
    A ref allele that differs from the genome raises ValueError naming the variant's line.
    """
    kind = model_kind(model)
    if kind not in ("causal", "mlm"):
        raise ValueError(f"variant scoring needs a language model, not a {kind!r} classifier")
    rows = []
    for v in variants:
        try:
            n = genome.length(v.chrom)
        except KeyError as e:
            raise ValueError(f"{v.where}: {e.args[0]}") from None
        start0, end0 = v.pos - 1, v.pos - 1 + len(v.ref)
        if end0 > n:
            raise ValueError(f"{v.where}: {v.chrom}:{v.pos} ref {v.ref} runs past the end of {v.chrom} "
                             f"(length {n:,})")
        have = genome.fetch(v.chrom, start0, end0).upper()
        if have != v.ref:
            raise ValueError(f"{v.where}: ref allele {v.ref} does not match the genome at {v.chrom}:{v.pos} "
                             f"(genome has {have}); is the position 1-based and the FASTA the right assembly?")
        lo, hi = max(0, start0 - flank), min(n, end0 + flank)
        left, right = genome.fetch(v.chrom, lo, start0), genome.fetch(v.chrom, end0, hi)
        if kind == "causal":
            ll_ref, ll_alt = _sum_loglik(model, [left + v.ref + right, left + v.alt + right])
        else:
            if len(v.ref) != 1 or len(v.alt) != 1:
                raise ValueError(f"{v.where}: the masked LM scores single-base substitutions only "
                                 f"(got {v.ref}>{v.alt}); use a causal checkpoint for indels")
            ids = encode(left + v.ref + right)
            ids[len(left)] = MASK_ID
            logp = model(ids[None])[0, len(left), :VOCAB_SIZE].float().log_softmax(-1)
            ll_ref, ll_alt = float(logp[encode(v.ref)[0]]), float(logp[encode(v.alt)[0]])
        rows.append({"chrom": v.chrom, "pos": v.pos, "ref": v.ref, "alt": v.alt, "llr": ll_alt - ll_ref,
                     "ll_ref": ll_ref, "ll_alt": ll_alt, "window": f"{v.chrom}:{lo + 1}-{hi}"})
    return rows


# --- embeddings ---------------------------------------------------------------------------------------
@torch.no_grad()
def embed(model: Model, seq: str | Tensor, per_base: bool = False, pooling: str = "mean") -> np.ndarray:
    """Backbone features of one sequence: (d_model,) pooled, or (L, d_model) with ``per_base``.
    Causal LM: final-norm hidden states (position t has read x_<=t); DNAModel: the head's input features
    (strand-averaged for the RC-equivariant backbone)."""
    ids = (encode(seq) if isinstance(seq, str) else seq.long())[None]
    model.eval()
    feats = model.backbone(ids)  # both model kinds name their trunk `backbone`: (1, L, d)
    if per_base:
        return feats[0].float().numpy()
    return pool(feats, None, pooling)[0].float().numpy()


def save_embeddings(out: str | os.PathLike, names: list[str], arrays: list[np.ndarray]) -> list[Path]:
    """Atomic write. ``.npy``: one stacked array (n, ...) (same shapes needed) and ``<out>.names.txt``;
    ``.safetensors``: one tensor per sequence name (any lengths). Returns the written paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".safetensors":
        from safetensors.numpy import save_file

        if len(set(names)) != len(names):
            raise ValueError("sequence names must be unique for .safetensors keys")
        atomic_write(out, lambda p: save_file({n: np.ascontiguousarray(a) for n, a in zip(names, arrays)}, p))
        return [out]
    if out.suffix != ".npy":
        raise ValueError(f"{out}: embeddings go to .npy or .safetensors")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{out}: per-base embeddings of different lengths {sorted(shapes)[:3]} cannot stack "
                         "into one .npy; use .safetensors")

    def write_npy(p: str) -> None:
        with open(p, "wb") as f:  # np.save on a path would append .npy to the temp name
            np.save(f, np.stack(arrays))

    atomic_write(out, write_npy)
    names_path = out.with_suffix(".names.txt")
    atomic_write(names_path, lambda p: Path(p).write_text("\n".join(names) + "\n"))
    return [out, names_path]


# --- generation ---------------------------------------------------------------------------------------
@torch.no_grad()
def generate_dna(model: Model, prompt: str, n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                 seed: int | None = None) -> str:
    """Continue ``prompt`` by ``n`` bases with a causal LM (constant cost per base through the recurrent state),
    sampling only A/C/G/T (ssm_core's ``generate`` with ``allowed_tokens``)."""
    if model_kind(model) != "causal":
        raise ValueError("generation needs a causal next-base LM checkpoint (e.g. runs/genomics/pretrained)")
    if not prompt:
        raise ValueError("generation needs a prompt of at least one base")
    if n < 0:
        raise ValueError(f"the number of bases to generate must be >= 0, got {n}")
    ids = encode(prompt)[None]
    out = model.generate(ids, max_new_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                         allowed_tokens=list(range(A_ID, T_ID + 1)))
    return decode(out[0, ids.shape[1]:])


# --- FASTA for the command line and the demo ------------------------------------------------------------
def read_fasta_records(text: str, name: str = "input") -> dict[str, str]:
    """Records of FASTA text (or one bare sequence, named ``seq1``); whitespace inside sequences is dropped.
    Bad characters raise ValueError naming the record, line and column."""
    recs: dict[str, str] = {}
    current, parts = None, []
    lines = text.splitlines()
    if not any(line.startswith(">") for line in lines):
        lines = [">seq1", *lines]
        offset = -1
    else:
        offset = 0
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if line.startswith(">"):
            if current is not None:
                recs[current] = "".join(parts)
            current = line[1:].split()[0] if line[1:].split() else f"seq{len(recs) + 1}"
            if current in recs:
                raise ValueError(f"{name}:{n + offset}: duplicate record name {current!r}")
            parts = []
        elif line:
            if current is None:
                raise ValueError(f"{name}:{n + offset}: sequence text before the first '>' header")
            seq = re.sub(r"\s+", "", line)
            try:
                encode(seq, where=f"{name}:{n + offset}")
            except ValueError as e:  # encode counts from 0; editors count columns from 1
                m = re.search(r"at position (\d+)", str(e))
                msg = str(e) if m is None else str(e).replace(m.group(0), f"at column {int(m.group(1)) + 1}")
                raise ValueError(msg) from None
            parts.append(seq.upper())
    if current is not None:
        recs[current] = "".join(parts)
    empty = [k for k, v in recs.items() if not v]
    if empty:
        raise ValueError(f"{name}: record {empty[0]!r} has no sequence")
    if not recs:
        raise ValueError(f"{name}: no sequence found")
    return recs


def _fasta_file(path: str) -> dict[str, str]:
    import gzip

    with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
        return read_fasta_records(f.read(), path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("loglik", "variants", "embed", "generate"):
        s = sub.add_parser(name)
        s.add_argument("--ckpt", help="save_pretrained directory (default: runs/genomics/pretrained, then the shipped "
                                      "multi-genome model)")
        if name != "generate":
            s.add_argument("--fasta", required=True)
            s.add_argument("--out", required=True)
    sub.choices["variants"].add_argument("--variants", required=True, help="VCF or 'chrom pos ref alt' list")
    sub.choices["variants"].add_argument("--flank", type=int, default=256)
    sub.choices["embed"].add_argument("--per-base", action="store_true")
    g = sub.choices["generate"]
    g.add_argument("--prompt", required=True)
    g.add_argument("--n", type=int, default=200)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)
    if args.cmd != "generate":  # before any work: where the result goes
        out = Path(args.out)
        if not out.parent.is_dir():
            raise FileNotFoundError(errno.ENOENT, f"no such folder to write {out.name} in", str(out.parent))
        if args.cmd == "embed" and out.suffix not in (".npy", ".safetensors"):
            raise ValueError(f"{out}: embeddings go to .npy or .safetensors")
    model = load_model(default_lm(args.ckpt))
    if args.cmd == "generate":
        print(args.prompt + generate_dna(model, args.prompt.upper(), args.n, args.temperature, args.top_k,
                                         args.top_p, args.seed))
        return
    if args.cmd == "variants":
        from apps.genomics.data import FastaReader

        with FastaReader(args.fasta) as genome:
            rows = score_variants(model, genome, read_variants(Path(args.variants)), args.flank)
        lines = ["chrom\tpos\tref\talt\tllr\tll_ref\tll_alt\twindow"]
        lines += [f"{r['chrom']}\t{r['pos']}\t{r['ref']}\t{r['alt']}\t{r['llr']:.4f}\t{r['ll_ref']:.4f}\t"
                  f"{r['ll_alt']:.4f}\t{r['window']}" for r in rows]
        atomic_write(args.out, lambda q: Path(q).write_text("\n".join(lines) + "\n"))
        print(f"{len(rows)} variants scored -> {args.out}")
        return
    recs = _fasta_file(args.fasta)
    if args.cmd == "loglik":
        from tqdm import tqdm

        lines = ["name\tpos\tbase\tloglik_nats\tsurprisal_bits"]
        for name, seq in tqdm(recs.items(), desc="log-likelihood"):
            ll = per_base_loglik(model, seq)
            lines += [f"{name}\t{i + 1}\t{b}\t{v:.5f}\t{-v / math.log(2):.5f}" for i, (b, v) in enumerate(zip(seq, ll))]
        atomic_write(args.out, lambda q: Path(q).write_text("\n".join(lines) + "\n"))
        print(f"{len(recs)} sequences -> {args.out}")
        return
    arrays = [embed(model, s, per_base=args.per_base) for s in recs.values()]
    written = save_embeddings(args.out, list(recs), arrays)
    print(f"{len(arrays)} embeddings ({arrays[0].shape[-1]} dims) -> {', '.join(map(str, written))}")


if __name__ == "__main__":
    run_cli(main)
