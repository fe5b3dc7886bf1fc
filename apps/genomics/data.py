"""DNA data for hiss: a HyenaDNA-compatible character tokenizer and a pyfaidx-backed FASTA reader.

Token ids follow HyenaDNA's CharacterTokenizer (characters "ACGTN"), so checkpoints and datasets that use
its ids line up with ours::

    [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11

Lower-case (soft-masked) bases get the upper-case ids; IUPAC ambiguity codes (R Y S W K M B D H V) become N.

Training data: BED intervals with HyenaDNA's ``chrom start end split`` columns (or a held-out tail of each
record), random windows with N filtering and reverse-complement augmentation, a GenBank reader (biopython)
for annotated tasks, and ``DNADataModule`` with HyenaDNA's sequence-length warm-up. Labels are the next
base; targets that are not A/C/G/T are ignored (-100), so bits/base is measured over real bases only.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfaidx
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from apps.common.data import ResumableLoader
from apps.common.paths import SAMPLES, repo_path

__all__ = [
    "VOCAB_SIZE", "CLS_ID", "SEP_ID", "BOS_ID", "MASK_ID", "PAD_ID", "RESERVED_ID", "UNK_ID",
    "A_ID", "C_ID", "G_ID", "T_ID", "N_ID", "BASE_IDS", "SPECIAL_TOKENS", "VOCAB", "MODEL_VOCAB_RANGE",
    "encode", "decode", "reverse_complement_ids", "FastaReader", "SAMPLE_FASTA", "Interval", "read_bed",
    "holdout_intervals", "RandomWindows", "TiledWindows", "pad_collate", "GenBankRecord", "read_genbank",
    "feature_mask", "warmup_stage", "DNADataModule",
]

SAMPLE_FASTA = SAMPLES / "ecoli_k12_w3110_300kb.fa.gz"
IGNORE = -100  # label of a position that is not scored

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = range(7, 12)
BASE_IDS = (A_ID, C_ID, G_ID, T_ID)  # the four bases bits/base is measured over
VOCAB: dict[str, int] = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, "A": A_ID, "C": C_ID, "G": G_ID,
                         "T": T_ID, "N": N_ID}
VOCAB_SIZE = len(VOCAB)  # 12
# the vocab_size a DNA model may have: these 12 ids, up to 16 where an exporter padded them; a model of 256+
# ids (bytes, subwords) is another app's and is refused by name, not scored as DNA
MODEL_VOCAB_RANGE = (VOCAB_SIZE, 16)
IUPAC_AMBIGUOUS = "RYSWKMBDHV"

_INVALID = -1
_LUT = torch.full((256,), _INVALID, dtype=torch.long)  # byte -> token id; -1 marks "not DNA"
for _ch, _id in (("A", A_ID), ("C", C_ID), ("G", G_ID), ("T", T_ID), ("N", N_ID)):
    _LUT[ord(_ch)] = _LUT[ord(_ch.lower())] = _id
for _ch in IUPAC_AMBIGUOUS:
    _LUT[ord(_ch)] = _LUT[ord(_ch.lower())] = N_ID

_COMPLEMENT = torch.arange(VOCAB_SIZE)  # specials and N map to themselves
_COMPLEMENT[A_ID], _COMPLEMENT[T_ID], _COMPLEMENT[C_ID], _COMPLEMENT[G_ID] = T_ID, A_ID, G_ID, C_ID

_ID_TO_CHAR = {A_ID: "A", C_ID: "C", G_ID: "G", T_ID: "T", N_ID: "N"}
_DECODE_LUT = torch.zeros(VOCAB_SIZE, dtype=torch.uint8)
for _id, _ch in _ID_TO_CHAR.items():
    _DECODE_LUT[_id] = ord(_ch)


def encode(seq: str | bytes, unk: bool = False, where: str = "sequence") -> Tensor:
    """Token ids (int64, shape (len(seq),)) of a DNA string, vectorised through a 256-entry table.

    A character that is not a base or IUPAC code raises ValueError naming it and its 0-based position
    (``where`` says what the sequence is, e.g. "chr1:1000"), or becomes [UNK] with ``unk=True``.
    """
    if isinstance(seq, str):
        try:
            raw = seq.encode("ascii")
        except UnicodeEncodeError as e:
            if not unk:
                raise ValueError(f"{where}: non-ASCII character {seq[e.start]!r} at position {e.start}") from None
            raw = seq.encode("ascii", errors="replace")  # '?' is not DNA: becomes [UNK] below
    else:
        raw = bytes(seq)
    if not raw:
        return torch.zeros(0, dtype=torch.long)
    ids = _LUT[torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()]
    bad = ids == _INVALID
    if bad.any():
        if not unk:
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"{where}: character {chr(raw[pos])!r} at position {pos} is not a DNA base "
                             f"(A, C, G, T, N or an IUPAC code {IUPAC_AMBIGUOUS})")
        ids[bad] = UNK_ID
    return ids


def decode(ids: Tensor | list[int]) -> str:
    """The string of a 1-D id sequence; bases and N as letters, specials as their bracketed names."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= VOCAB_SIZE):
        raise ValueError(f"decode: ids must lie in [0, {VOCAB_SIZE}), got range [{int(ids.min())}, {int(ids.max())}]")
    if bool((ids < A_ID).any()):  # rare: specials present, spell them out
        return "".join(_ID_TO_CHAR.get(i, SPECIAL_TOKENS[i] if i < A_ID else "") for i in ids.tolist())
    return _DECODE_LUT[ids].numpy().tobytes().decode("ascii")


def reverse_complement_ids(ids: Tensor) -> Tensor:
    """Reverse complement along the last dimension (A<->T, C<->G; N and specials unchanged)."""
    return _COMPLEMENT.to(ids.device)[ids.long()].flip(-1).to(ids.dtype)


def _line_of_header(path: Path, name: str) -> int | None:
    """1-based line number of the header ``>name`` (only called on the error path)."""
    opener = _open_text(path)
    with opener as f:
        for i, line in enumerate(f, 1):
            if line.startswith(">") and line[1:].split(maxsplit=1)[:1] == [name]:
                return i
    return None


def _open_text(path: Path):
    if str(path).endswith(".gz"):
        return gzip.open(path, "rt", encoding="ascii", errors="replace")
    return open(path, encoding="ascii", errors="replace")


class FastaReader:
    """Random access to the records of a FASTA file (plain or bgzip ``.fa.gz``) through pyfaidx's .fai index.

    Sequences stay on disk: ``fetch``/``tokens`` read only the requested interval, so genomes of any size
    work in constant memory. A missing index is built; a stale one (older than the FASTA) is rebuilt; one
    that cannot be written (read-only folder) is an error that says so. Malformed files (text before the
    first header, ragged line lengths, duplicate names) and empty records raise ValueError naming the
    file and line.
    """

    def __init__(self, path: str | os.PathLike, allow_empty: bool = False):
        self.path = Path(path)
        self.allow_empty = allow_empty
        if not self.path.is_file():
            raise FileNotFoundError(f"FASTA file not found: {self.path}")
        self._check_start()
        fai = Path(str(self.path) + ".fai")
        stale = fai.is_file() and fai.stat().st_mtime < self.path.stat().st_mtime
        if (not fai.is_file() or stale) and not os.access(fai.parent, os.W_OK):
            why = "is older than the FASTA" if stale else "is missing"
            raise PermissionError(f"{self.path}: the index {fai.name} {why} and {fai.parent} is not writable; "
                                  f"run `samtools faidx {self.path}` (or pyfaidx.Faidx) where you can write")
        try:
            # rebuild=True: pyfaidx rebuilds an index older than the FASTA; strict_bounds: no silent clipping
            self._fa = pyfaidx.Fasta(str(self.path), rebuild=True, strict_bounds=True, as_raw=True,
                                     sequence_always_upper=False, read_long_names=False)
        except pyfaidx.UnsupportedCompressionFormat as e:
            raise ValueError(f"{self.path}: gzip FASTA must be bgzip-compressed for random access "
                             f"(`bgzip -d | bgzip`, or Bio.bgzf): {e}") from None
        except (pyfaidx.FastaIndexingError, ValueError) as e:
            raise ValueError(f"{self.path}: malformed FASTA ({e})") from None
        self.lengths: dict[str, int] = {name: len(rec) for name, rec in self._fa.records.items()}
        self._validate_index(fai)
        if not self.lengths:
            raise ValueError(f"{self.path}: no FASTA records (no line starts with '>')")
        if not allow_empty:
            for name, n in self.lengths.items():
                if n == 0:
                    line = _line_of_header(self.path, name)
                    raise ValueError(f"{self.path}:{line}: record {name!r} has no sequence")

    def _check_start(self) -> None:
        """pyfaidx silently skips text before the first '>' (and reads an empty file as no records)."""
        with _open_text(self.path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    if not line.startswith(">"):
                        raise ValueError(f"{self.path}:{i}: expected a '>' header line, found {line[:40]!r}")
                    return
        raise ValueError(f"{self.path}: no FASTA records (the file is empty)")

    def _validate_index(self, fai: Path) -> None:
        """An index that points past the end of an uncompressed file belongs to another version of it."""
        if str(self.path).endswith(".gz"):
            return
        size = self.path.stat().st_size
        for name, rec in self._fa.faidx.index.items():
            if rec.offset + rec.rlen + (rec.rlen // max(rec.lenc, 1)) * (rec.lenb - rec.lenc) > size + rec.lenb:
                raise ValueError(f"{fai}: index entry for {name!r} points past the end of {self.path}; "
                                 f"delete {fai.name} to rebuild it")

    @property
    def names(self) -> list[str]:
        return list(self.lengths)

    def __contains__(self, name: str) -> bool:
        return name in self.lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def length(self, name: str) -> int:
        try:
            return self.lengths[name]
        except KeyError:
            raise KeyError(f"{self.path}: no record named {name!r} (records: {', '.join(self.names[:10])}"
                           f"{' ...' if len(self.names) > 10 else ''})") from None

    def fetch(self, name: str, start: int = 0, end: int | None = None) -> str:
        """Bases [start, end) of record ``name`` (0-based, end exclusive) as a string, case as in the file."""
        n = self.length(name)
        end = n if end is None else end
        if not 0 <= start <= end <= n:
            raise ValueError(f"{self.path}: interval {name}:{start}-{end} is outside the record (length {n:,})")
        if start == end:
            return ""
        return str(self._fa[name][start:end])

    def tokens(self, name: str, start: int = 0, end: int | None = None, unk: bool = False) -> Tensor:
        """Token ids of bases [start, end) of ``name``; a non-DNA character is named with its file:line:column
        and its position in the record."""
        seq = self.fetch(name, start, end)
        try:
            return encode(seq, unk=unk, where=f"{self.path}: {name}")
        except ValueError as e:
            # re-anchor the offset: encode counts from `start`, users want the position in the record and file
            msg = str(e)
            m = re.search(r": character (.+?) at position (\d+) (.*)$", msg)
            if m is None:
                raise
            pos = start + int(m.group(2))
            raise ValueError(f"{self.where(name, pos)}: character {m.group(1)} at position {pos} (0-based) of record "
                             f"{name!r} {m.group(3)}") from None

    def where(self, name: str, pos: int) -> str:
        """``FILE:LINE:COLUMN`` (1-based, as editors count) of base ``pos`` (0-based) of record ``name``, from the
        index's line layout; ``FILE`` alone when the layout is unknown. Scans the file for the header: for error
        messages, not for loops."""
        rec = self._fa.faidx.index.get(name)
        header = _line_of_header(self.path, name)
        if rec is None or header is None or not rec.lenc:
            return str(self.path)
        return f"{self.path}:{header + 1 + pos // rec.lenc}:{pos % rec.lenc + 1}"

    def close(self) -> None:
        self._fa.close()

    # file handles do not pickle: DataLoader workers and spawned processes reopen the file
    def __getstate__(self) -> dict:
        return {"path": self.path, "allow_empty": self.allow_empty}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["allow_empty"])

    def __enter__(self) -> FastaReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FastaReader({str(self.path)!r}, {len(self)} records, {sum(self.lengths.values()):,} bases)"


# ---------------------------------------------------------------------------------------------------------------
# Intervals: BED files (HyenaDNA's 4-column convention) or a held-out tail of each record

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}


@dataclass(frozen=True)
class Interval:
    """Bases [start, end) of record ``chrom`` (0-based, end exclusive, as in BED) in split ``split``."""

    chrom: str
    start: int
    end: int
    split: str = "train"

    def __len__(self) -> int:
        return self.end - self.start


def read_bed(path: str | os.PathLike, fasta: FastaReader | None = None,
             default_split: str | None = None) -> list[Interval]:
    """Intervals of a BED file: ``chrom start end [split]`` (tab or space separated; extra columns ignored).

    The 4th column names the split (train / val / test; HyenaDNA's "valid" and "validation" also read as
    val); files without it need ``default_split``. Comment, ``track`` and ``browser`` lines
    are skipped. With ``fasta``, every interval must lie inside its record. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"BED file not found: {path}")
    out: list[Interval] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            cols = line.split()
            where = f"{path}:{lineno}"
            if len(cols) < 3:
                raise ValueError(f"{where}: expected at least 3 columns (chrom start end [split]), got {len(cols)}")
            try:
                start, end = int(cols[1]), int(cols[2])
            except ValueError:
                raise ValueError(f"{where}: start and end must be integers, got {cols[1]!r} and {cols[2]!r}") from None
            if not 0 <= start < end:
                raise ValueError(f"{where}: need 0 <= start < end, got start={start} end={end}")
            if len(cols) >= 4:
                split = _SPLIT_ALIASES.get(cols[3].lower())
                if split is None:
                    raise ValueError(f"{where}: split must be one of train/val/test, got {cols[3]!r}")
            elif default_split is not None:
                split = default_split
            else:
                raise ValueError(f"{where}: no split column; add one (train/val/test) or pass default_split")
            chrom = cols[0]
            if fasta is not None:
                if chrom not in fasta:
                    raise ValueError(f"{where}: chrom {chrom!r} is not a record of {fasta.path} "
                                     f"(records: {', '.join(fasta.names[:5])}{' ...' if len(fasta) > 5 else ''})")
                if end > fasta.length(chrom):
                    raise ValueError(f"{where}: interval {chrom}:{start}-{end} ends past the record "
                                     f"(length {fasta.length(chrom):,}) in {fasta.path}")
            out.append(Interval(chrom, start, end, split))
    if not out:
        raise ValueError(f"{path}: no intervals")
    return out


def holdout_intervals(fasta: FastaReader, valid_frac: float = 0.05, test_frac: float = 0.05) -> list[Interval]:
    """Split each record into train | val | test by position: the last ``test_frac`` of every record is
    test, the ``valid_frac`` before it val (contiguous blocks, so windows never straddle two splits)."""
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise ValueError(f"holdout fractions must be in [0, 1) and sum below 1, got {valid_frac}, {test_frac}")
    out = []
    for name, n in fasta.lengths.items():
        t0 = n - round(n * test_frac)
        v0 = t0 - round(n * valid_frac)
        for split, a, b in (("train", 0, v0), ("val", v0, t0), ("test", t0, n)):
            if b > a:
                out.append(Interval(name, a, b, split))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Window datasets

def _targets(window: Tensor) -> tuple[Tensor, Tensor]:
    """(input_ids, labels) of a window of L + 1 ids: labels are the next base, non-ACGT targets ignored."""
    x, y = window[:-1].long(), window[1:].long()
    y = torch.where((y >= A_ID) & (y <= T_ID), y, torch.full_like(y, IGNORE))
    return x, y


class _TokenSource:
    """Token ids of intervals: kept in memory as uint8 when small, otherwise read from the FASTA per window."""

    def __init__(self, fasta: FastaReader, intervals: list[Interval], in_memory_max_bases: int):
        self.fasta, self.intervals = fasta, intervals
        total = sum(len(iv) for iv in intervals)
        self.cache: list[Tensor] | None = None
        if total <= in_memory_max_bases:
            self.cache = [fasta.tokens(iv.chrom, iv.start, iv.end).to(torch.uint8) for iv in intervals]

    def get(self, k: int, a: int, b: int) -> Tensor:
        """Ids of bases [a, b) relative to interval k's start."""
        if self.cache is not None:
            return self.cache[k][a:b].long()
        iv = self.intervals[k]
        return self.fasta.tokens(iv.chrom, iv.start + a, iv.start + b)


class RandomWindows(Dataset):
    """``n`` random windows of ``seq_len`` inputs (+1 for the last target) from ``intervals``.

    Window i of epoch e is drawn from its own generator (seed, epoch, i), so epochs differ, runs repeat,
    and DDP ranks (which see different i) never duplicate work. Intervals are picked in proportion to how
    many windows they hold; a window with more than ``max_n_frac`` N is redrawn. With ``rc_aug`` half of
    the windows are reverse-complemented (both strands are DNA the model should predict).
    """

    def __init__(self, fasta: FastaReader, intervals: list[Interval], seq_len: int, n: int, rc_aug: bool = False,
                 max_n_frac: float = 0.1, seed: int = 0, in_memory_max_bases: int = 1 << 28, max_tries: int = 100):
        if seq_len < 1 or n < 1:
            raise ValueError(f"RandomWindows: seq_len and n must be positive, got {seq_len}, {n}")
        usable = [iv for iv in intervals if len(iv) > seq_len]
        if not usable:
            longest = max((len(iv) for iv in intervals), default=0)
            raise ValueError(f"{fasta.path}: no interval holds a window of {seq_len + 1:,} bases "
                             f"(longest interval: {longest:,}); lower seq_len")
        self.source = _TokenSource(fasta, usable, in_memory_max_bases)
        self.seq_len, self.n, self.rc_aug, self.max_n_frac = seq_len, n, rc_aug, max_n_frac
        self.seed, self.epoch, self.max_tries = seed, 0, max_tries
        self.weights = torch.tensor([len(iv) - seq_len for iv in usable], dtype=torch.float64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_000_007 + i)
        for _ in range(self.max_tries):
            k = int(torch.multinomial(self.weights, 1, generator=g))
            a = int(torch.randint(0, int(self.weights[k]), (1,), generator=g))
            w = self.source.get(k, a, a + self.seq_len + 1)
            if float((w == N_ID).float().mean()) <= self.max_n_frac:
                break
        else:
            raise RuntimeError(f"RandomWindows: {self.max_tries} windows in a row had more than "
                               f"{self.max_n_frac:.0%} N; raise max_n_frac or use a BED without N-rich regions")
        if self.rc_aug and bool(torch.rand((), generator=g) < 0.5):
            w = reverse_complement_ids(w)
        x, y = _targets(w)
        return {"input_ids": x, "labels": y}


class TiledWindows(Dataset):
    """Every base of ``intervals`` once: consecutive windows of ``seq_len`` inputs overlapping by one base
    (so each base but an interval's first is a target exactly once). An interval's last window is shorter;
    ``pad_collate`` pads a batch to its longest window with [PAD] and ignored labels. For validation and
    test: deterministic, no augmentation."""

    def __init__(self, fasta: FastaReader, intervals: list[Interval], seq_len: int,
                 in_memory_max_bases: int = 1 << 28):
        intervals = [iv for iv in intervals if len(iv) >= 2]
        self.source = _TokenSource(fasta, intervals, in_memory_max_bases)
        self.seq_len = seq_len
        self.index = [(k, a) for k, iv in enumerate(intervals) for a in range(0, len(iv) - 1, seq_len)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        k, a = self.index[i]
        x, y = _targets(self.source.get(k, a, a + self.seq_len + 1))
        return {"input_ids": x, "labels": y}


def pad_collate(batch: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack windows of different lengths, right-padding inputs with [PAD] and labels with -100 (ignored)."""
    n = max(b["input_ids"].shape[0] for b in batch)
    x = torch.full((len(batch), n), PAD_ID, dtype=torch.long)
    y = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    for i, b in enumerate(batch):
        x[i, : b["input_ids"].shape[0]] = b["input_ids"]
        y[i, : b["labels"].shape[0]] = b["labels"]
    return {"input_ids": x, "labels": y}


# ---------------------------------------------------------------------------------------------------------------
# GenBank (biopython): sequences with their annotation, for coding / non-coding and similar labels

@dataclass
class GenBankRecord:
    id: str
    sequence: str
    features: list  # Bio.SeqFeature.SeqFeature objects (type, location, qualifiers)

    def tokens(self, unk: bool = False) -> Tensor:
        return encode(self.sequence, unk=unk, where=f"GenBank record {self.id}")


def read_genbank(path: str | os.PathLike) -> Iterator[GenBankRecord]:
    """Records of a GenBank file (plain or .gz), one at a time, each with its sequence and features."""
    from Bio import BiopythonParserWarning, SeqIO
    from Bio.Seq import UndefinedSequenceError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenBank file not found: {path}")
    n = 0
    with _open_text(path) as f:
        records = SeqIO.parse(f, "genbank")
        while True:
            # biopython only warns about a truncated record; a silently short sequence would corrupt labels
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", BiopythonParserWarning)
                try:
                    rec = next(records)
                except StopIteration:
                    break
                except ValueError as e:
                    raise ValueError(f"{path}: malformed GenBank (record {n + 1}): {e}") from None
            n += 1
            for w in caught:
                msg = str(w.message)
                if "Expected sequence length" in msg or "Premature end" in msg:
                    raise ValueError(f"{path}: GenBank record {n} ({rec.id}) is truncated: {msg}")
                warnings.warn(f"{path}: record {n}: {msg}", BiopythonParserWarning, stacklevel=2)
            try:
                seq = str(rec.seq)
            except UndefinedSequenceError:
                raise ValueError(f"{path}: record {rec.id!r} has no sequence (no ORIGIN section)") from None
            if not seq:
                raise ValueError(f"{path}: record {rec.id!r} has an empty sequence")
            yield GenBankRecord(rec.id, seq, list(rec.features))
    if n == 0:
        raise ValueError(f"{path}: no GenBank records (expected a LOCUS line)")


def feature_mask(record: GenBankRecord, types: tuple[str, ...] = ("CDS",)) -> Tensor:
    """Bool (len(sequence),): True at bases covered by a feature of one of ``types`` (either strand)."""
    mask = torch.zeros(len(record.sequence), dtype=torch.bool)
    for feat in record.features:
        if feat.type in types:
            for part in feat.location.parts:  # joins (spliced / origin-spanning) are several parts
                mask[int(part.start) : int(part.end)] = True
    return mask


# ---------------------------------------------------------------------------------------------------------------
# The LightningDataModule, with HyenaDNA's sequence-length warm-up

def warmup_stage(epoch: int, seq_len: int, batch_size: int, min_len: int | None, every_epochs: int) -> tuple[int, int]:
    """(seq_len, batch_size) of an epoch under HyenaDNA's doubling warm-up: start at ``min_len`` and double
    every ``every_epochs`` epochs until ``seq_len``; the batch grows by the same factor (tokens per batch
    stay at seq_len * batch_size) so the optimiser sees comparable gradient noise throughout."""
    if not min_len or min_len >= seq_len:
        return seq_len, batch_size
    length = min(seq_len, min_len * 2 ** (epoch // max(every_epochs, 1)))
    return length, max(1, batch_size * seq_len // length)


class DNADataModule(pl.LightningDataModule):
    """Next-base batches ``{"input_ids", "labels"}`` (batch, seq_len) from a FASTA file.

    Splits come from ``bed`` (``chrom start end split``) or, without one, from the last ``valid_frac`` /
    ``test_frac`` of every record. Training draws ``samples_per_epoch`` random windows per epoch (N-filtered,
    reverse-complement augmented); validation and test tile their intervals exactly once.

    Sequence-length warm-up (``warmup_min_len``): epoch e trains on windows of
    min(seq_len, warmup_min_len * 2^(e // warmup_every_epochs)) bases with the batch scaled to keep tokens
    per batch (and per epoch) constant. The train loader is rebuilt every epoch, and a run resumed from a
    mid-epoch checkpoint continues with the batch the interrupted run had not trained on
    (apps.common.data.ResumableLoader).
    """

    def __init__(self, fasta: str = str(SAMPLE_FASTA), bed: str | None = None, seq_len: int = 1024,
                 batch_size: int = 8, samples_per_epoch: int = 1024, valid_frac: float = 0.05,
                 test_frac: float = 0.05, rc_aug: bool = True, max_n_frac: float = 0.1,
                 warmup_min_len: int | None = None, warmup_every_epochs: int = 1, num_workers: int = 0,
                 seed: int = 0, in_memory_max_bases: int = 1 << 28, eval_batch_size: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("samples_per_epoch", samples_per_epoch)):
            if value < 1:
                raise ValueError(f"DNADataModule: {name} must be at least 1, got {value}")
        if warmup_min_len is not None and (warmup_min_len < 1 or warmup_min_len > seq_len):
            raise ValueError(f"DNADataModule: warmup_min_len must be in [1, seq_len={seq_len}], got {warmup_min_len}")
        self.fasta: FastaReader | None = None
        self.intervals: list[Interval] = []
        self._train: RandomWindows | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.fasta is not None:
            return
        hp = self.hparams
        self.fasta = FastaReader(repo_path(hp.fasta))
        if hp.bed:
            self.intervals = read_bed(repo_path(hp.bed), self.fasta)
        else:
            self.intervals = holdout_intervals(self.fasta, hp.valid_frac, hp.test_frac)
        if self.trainer is not None:
            # a new loader each epoch: the warm-up changes the window length, and each epoch draws its windows
            # from (seed, epoch, i) from the first batch on (also after resuming at an epoch's end)
            self.trainer.reload_dataloaders_every_n_epochs = 1

    def split(self, name: str) -> list[Interval]:
        out = [iv for iv in self.intervals if iv.split == name]
        if not out:
            src = self.hparams.bed or f"{self.hparams.fasta} (held-out fractions)"
            raise ValueError(f"{src}: no intervals in split {name!r}")
        return out

    def current_stage(self) -> tuple[int, int]:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        hp = self.hparams
        return warmup_stage(epoch, hp.seq_len, hp.batch_size, hp.warmup_min_len, hp.warmup_every_epochs)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        hp = self.hparams
        length, batch = self.current_stage()
        n = max(batch, math.ceil(hp.samples_per_epoch * hp.seq_len / length))  # constant tokens per epoch
        ds = RandomWindows(self.fasta, self.split("train"), length, n, rc_aug=hp.rc_aug, max_n_frac=hp.max_n_frac,
                           seed=hp.seed, in_memory_max_bases=hp.in_memory_max_bases)
        ds.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        self._train = ds
        # in index order, resumable mid-epoch: a run resumed from a checkpoint trains on the batches the
        # interrupted one had not reached, the same windows in the same order
        return ResumableLoader(ds, batch_size=batch, trainer=self.trainer, drop_last=True,
                               num_workers=hp.num_workers, persistent_workers=False)

    def _eval_loader(self, split: str) -> DataLoader:
        self.setup()
        hp = self.hparams
        ds = TiledWindows(self.fasta, self.split(split), hp.seq_len, hp.in_memory_max_bases)
        return DataLoader(ds, batch_size=hp.eval_batch_size or hp.batch_size, shuffle=False,
                          num_workers=hp.num_workers, collate_fn=pad_collate)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
