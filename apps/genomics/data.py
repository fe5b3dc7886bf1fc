"""DNA data for hiss: a HyenaDNA-compatible character tokenizer and a pyfaidx-backed FASTA reader.

Token ids follow HyenaDNA's CharacterTokenizer (characters "ACGTN"), so checkpoints and datasets that use
its ids line up with ours::

    [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6 A=7 C=8 G=9 T=10 N=11

Lower-case (soft-masked) bases get the upper-case ids; IUPAC ambiguity codes (R Y S W K M B D H V) become N.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyfaidx
import torch
from torch import Tensor

__all__ = [
    "VOCAB_SIZE", "CLS_ID", "SEP_ID", "BOS_ID", "MASK_ID", "PAD_ID", "RESERVED_ID", "UNK_ID",
    "A_ID", "C_ID", "G_ID", "T_ID", "N_ID", "BASE_IDS", "SPECIAL_TOKENS", "VOCAB",
    "encode", "decode", "reverse_complement_ids", "FastaReader",
]

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]")
CLS_ID, SEP_ID, BOS_ID, MASK_ID, PAD_ID, RESERVED_ID, UNK_ID = range(7)
A_ID, C_ID, G_ID, T_ID, N_ID = range(7, 12)
BASE_IDS = (A_ID, C_ID, G_ID, T_ID)  # the four bases bits/base is measured over
VOCAB: dict[str, int] = {**{t: i for i, t in enumerate(SPECIAL_TOKENS)}, "A": A_ID, "C": C_ID, "G": G_ID,
                         "T": T_ID, "N": N_ID}
VOCAB_SIZE = len(VOCAB)  # 12
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
        import gzip

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
        """Token ids of bases [start, end) of ``name``; a non-DNA character names its record position."""
        seq = self.fetch(name, start, end)
        try:
            return encode(seq, unk=unk, where=f"{self.path}: {name}")
        except ValueError as e:
            # re-anchor the offset: encode counts from `start`, users want the position in the record
            msg = str(e)
            if " at position " in msg:
                head, tail = msg.split(" at position ", 1)
                pos, rest = tail.split(" ", 1)
                msg = f"{head} at position {start + int(pos)} (0-based) {rest}"
            raise ValueError(msg) from None

    def close(self) -> None:
        self._fa.close()

    def __enter__(self) -> FastaReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FastaReader({str(self.path)!r}, {len(self)} records, {sum(self.lengths.values()):,} bases)"
