"""Bytes as tokens: any files (text or binary; invalid UTF-8 is just bytes), split into train/val/test by
file, read lazily (memory-mapped) so corpora larger than RAM (PG19, enwik8) work.

Vocabulary: ids 0-255 are the bytes; with ``specials=True`` each document is framed as BOS bytes EOS
(BOS=256, EOS=257; PAD=258 fills short batches and is never scored), vocabulary 259.
"""

from __future__ import annotations

import bisect
import fnmatch
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from apps.common.data import ResumableLoader
from apps.common.paths import SAMPLES, repo_path

__all__ = ["BOS", "EOS", "PAD", "SAMPLE_DIR", "Doc", "ByteCorpus", "ByteDataModule", "encode", "enwik8_splits",
           "list_files", "pg19_splits", "split_files", "vocab_size"]

BOS, EOS, PAD = 256, 257, 258
SAMPLE_DIR = SAMPLES / "python_docs"
IGNORE = -100


def vocab_size(specials: bool) -> int:
    return 259 if specials else 256


def encode(data: bytes | str, bos: bool = False) -> Tensor:
    """bytes (or str, UTF-8 encoded) -> (L,) int64 token ids, optionally after BOS."""
    raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() if raw else torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.tensor([BOS]), ids]) if bos else ids


@dataclass(frozen=True)
class Doc:
    """One document: bytes [start, end) of a file (end None: to the end of the file)."""

    path: Path
    start: int = 0
    end: int | None = None

    def bytes_view(self) -> np.ndarray:
        size = self.path.stat().st_size
        end = size if self.end is None else self.end
        if not 0 <= self.start <= end <= size:
            raise ValueError(f"{self.path}: byte range [{self.start}, {end}) outside the file (size {size})")
        if end == self.start:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.start, shape=(end - self.start,))

    def __len__(self) -> int:
        return (self.path.stat().st_size if self.end is None else self.end) - self.start


def list_files(paths: list[str | Path], pattern: str = "*") -> list[Path]:
    """Files named directly, plus the files under folders (recursively, sorted, hidden ones skipped) whose
    name matches ``pattern``. A path that does not exist is an error naming it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and fnmatch.fnmatch(f.name, pattern)
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise FileNotFoundError(f"{p}: no files matching {pattern!r} in this folder")
            out.extend(found)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


def _file_key(f: Path, roots: list[Path]) -> int:
    # by name, not by position in the listing: adding a file never moves the others between splits; and by the
    # name under the folder it was listed from ("pydocs/faq/x.rst.txt"), so a clone elsewhere splits the same
    for r in roots:
        if r.is_dir() and f.is_relative_to(r):
            return zlib.crc32((Path(r.resolve().name) / f.relative_to(r)).as_posix().encode())
    return zlib.crc32(f.name.encode())


def split_files(files: list[Path], valid_fraction: float = 0.1, test_fraction: float = 0.1,
                roots: list[str | Path] = ()) -> tuple[list[Path], list[Path], list[Path]]:
    """Deterministic split by file: files ordered by a hash of their name under the folder of ``roots`` they
    were listed from (their file name otherwise); the first ones are test, the next val, the rest train (each
    held-out split gets at least one file). Needs at least 3 files."""
    if len(files) < 3:
        raise ValueError(f"split by file needs at least 3 files, got {len(files)}: {[str(f) for f in files]}")
    roots = [Path(r) for r in roots]
    order = sorted(files, key=lambda f: _file_key(f, roots))
    n_test = max(1, round(test_fraction * len(files)))
    n_valid = max(1, round(valid_fraction * len(files)))
    if n_test + n_valid >= len(files):
        raise ValueError(f"{len(files)} files leave nothing to train on with valid_fraction={valid_fraction}, "
                         f"test_fraction={test_fraction}")
    return order[n_test + n_valid:], order[n_test:n_test + n_valid], order[:n_test]


def pg19_splits(root: str | Path) -> dict[str, list[Doc]]:
    """PG19's layout: ``root/{train,validation,test}/*.txt``, one book per file."""
    root = Path(root)
    out = {}
    for split, folder in (("train", "train"), ("val", "validation"), ("test", "test")):
        d = root / folder
        if not d.is_dir():
            raise FileNotFoundError(f"{d}: missing; PG19 has train/, validation/ and test/ folders of .txt books")
        out[split] = [Doc(f) for f in list_files([d], "*.txt")]
    return out


def enwik8_splits(path: str | Path, n_valid: int = 5_000_000, n_test: int = 5_000_000) -> dict[str, list[Doc]]:
    """enwik8's standard split: the first 90M bytes train, the next 5M val, the last 5M test."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (enwik8 is one 100,000,000-byte file)")
    size = path.stat().st_size
    if size <= n_valid + n_test:
        raise ValueError(f"{path}: {size} bytes is not more than valid+test ({n_valid + n_test})")
    a, b = size - n_valid - n_test, size - n_test
    return {"train": [Doc(path, 0, a)], "val": [Doc(path, a, b)], "test": [Doc(path, b, size)]}


class ByteCorpus:
    """Documents as one virtual token stream (each framed by BOS/EOS when ``specials``), read by position."""

    def __init__(self, docs: list[Doc], specials: bool = False):
        if not docs:
            raise ValueError("ByteCorpus: no documents")
        self.docs, self.specials = docs, specials
        frame = 2 if specials else 0
        self.lengths = [len(d) + frame for d in docs]
        self.offsets = np.cumsum([0, *self.lengths]).tolist()
        self._views: dict[int, np.ndarray] = {}
        self.pad_id = PAD if specials else 0  # a 256-id vocabulary has no PAD; its labels are ignored anyway

    def __len__(self) -> int:
        return self.offsets[-1]

    def doc_tokens(self, i: int) -> Tensor:
        """The whole of document i: (L,) int64."""
        return self.read(self.offsets[i], self.lengths[i])

    def _view(self, i: int) -> np.ndarray:
        if i not in self._views:
            self._views[i] = self.docs[i].bytes_view()
        return self._views[i]

    def read(self, start: int, n: int) -> Tensor:
        """Tokens [start, start + n) of the stream: (n,) int64 (shorter at the end of the stream)."""
        pieces, pos, end = [], start, min(start + n, len(self))
        while pos < end:
            i = bisect.bisect_right(self.offsets, pos) - 1
            a, b = pos - self.offsets[i], min(end, self.offsets[i + 1]) - self.offsets[i]
            if self.specials:
                n_bytes = self.lengths[i] - 2
                body = torch.from_numpy(np.asarray(self._view(i)[max(a - 1, 0):min(b - 1, n_bytes)]).astype(np.int64))
                head = [BOS] if a == 0 else []
                tail = [EOS] if b == self.lengths[i] else []
                pieces += [torch.tensor(head, dtype=torch.long), body, torch.tensor(tail, dtype=torch.long)]
            else:
                pieces.append(torch.from_numpy(np.asarray(self._view(i)[a:b]).astype(np.int64)))
            pos = self.offsets[i] + b
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


class RandomWindows(Dataset):
    """``n`` windows of ``seq_len + 1`` tokens at random positions (re-drawn each epoch through the seed)."""

    def __init__(self, corpus: ByteCorpus, seq_len: int, n: int, seed: int = 0):
        self.corpus, self.seq_len, self.n, self.seed = corpus, seq_len, n, seed
        self.span = max(1, len(corpus) - seq_len - 1)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        start = int(torch.randint(0, self.span, (1,), generator=g))
        return _window(self.corpus.read(start, self.seq_len + 1), self.seq_len, self.corpus.pad_id)


class Consecutive(Dataset):
    """The stream cut into non-overlapping windows in order (validation: every token scored once)."""

    def __init__(self, corpus: ByteCorpus, seq_len: int, max_tokens: int | None = None):
        self.corpus, self.seq_len = corpus, seq_len
        total = len(corpus) if max_tokens is None else min(len(corpus), max_tokens)
        self.n = max(1, -(-(total - 1) // seq_len))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return _window(self.corpus.read(i * self.seq_len, self.seq_len + 1), self.seq_len, self.corpus.pad_id)


class Streams(Dataset):
    """Truncated BPTT across batches: the stream is cut into ``batch_size`` contiguous rows and batch j holds
    the j-th window of every row, so batch j+1 continues batch j and the module can carry the state.
    Item j is a whole batch (use ``DataLoader(batch_size=None)``); ``reset`` is True on the first one."""

    def __init__(self, corpus: ByteCorpus, seq_len: int, batch_size: int):
        self.corpus, self.seq_len, self.batch_size = corpus, seq_len, batch_size
        self.row_len = len(corpus) // batch_size
        self.n = (self.row_len - 1) // seq_len
        if self.n < 1:
            raise ValueError(f"Streams: {len(corpus)} tokens are too few for {batch_size} rows of {seq_len + 1}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, j: int) -> dict:
        rows = torch.stack([self.corpus.read(b * self.row_len + j * self.seq_len, self.seq_len + 1)
                            for b in range(self.batch_size)])  # (batch, seq_len + 1): full by construction
        return {"input_ids": rows[:, :-1], "labels": rows[:, 1:], "reset": j == 0}


def _window(tokens: Tensor, seq_len: int, pad_id: int) -> dict:
    """seq_len + 1 tokens -> shifted inputs/labels (seq_len,); a short window is padded (inputs pad_id, labels
    ignored). Padding comes after the real tokens, so in a causal model it never changes their predictions."""
    x = torch.full((seq_len,), pad_id, dtype=torch.long)
    y = torch.full((seq_len,), IGNORE, dtype=torch.long)
    n = max(len(tokens) - 1, 0)
    x[:n], y[:n] = tokens[:-1][:n], tokens[1:][:n]
    return {"input_ids": x, "labels": y}


class ByteDataModule(pl.LightningDataModule):
    """Byte-level LM data for LightningCLI (YAML section ``data:``).

    paths: files and folders (default: the bundled Python-docs sample); pattern: file-name filter in folders.
    layout: "files" (split by file), "pg19" (paths[0] is a PG19 root) or "enwik8" (paths[0] is the file).
    seq_len: tokens per training window (read in model.chunk_len pieces with the state carried across).
    tbptt: feed consecutive windows of the same streams in order, for state carried across batches.
    """

    def __init__(self, paths: list[str] | None = None, pattern: str = "*", layout: str = "files",
                 valid_fraction: float = 0.1, test_fraction: float = 0.1, specials: bool = False,
                 seq_len: int = 1024, batch_size: int = 8, samples_per_epoch: int = 2000,
                 val_tokens: int | None = 200_000, tbptt: bool = False, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.paths = [str(repo_path(p)) for p in paths] if paths else [str(SAMPLE_DIR)]
        self.splits: dict[str, list[Doc]] = {}

    def split_docs(self) -> dict[str, list[Doc]]:
        hp = self.hparams
        if not self.splits:
            if hp.layout == "files":
                train, valid, test = split_files(list_files(self.paths, hp.pattern), hp.valid_fraction,
                                                 hp.test_fraction, roots=self.paths)
                self.splits = {"train": [Doc(f) for f in train], "val": [Doc(f) for f in valid],
                               "test": [Doc(f) for f in test]}
            elif hp.layout == "pg19":
                self.splits = pg19_splits(self.paths[0])
            elif hp.layout == "enwik8":
                self.splits = enwik8_splits(self.paths[0])
            else:
                raise ValueError(f"data.layout must be 'files', 'pg19' or 'enwik8', got {hp.layout!r}")
        return self.splits

    def corpus(self, split: str) -> ByteCorpus:
        return ByteCorpus(self.split_docs()[split], self.hparams.specials)

    def train_dataloader(self) -> DataLoader:
        hp, corpus = self.hparams, self.corpus("train")
        # in index order and resumable mid-epoch (apps.common.data): a run resumed from a checkpoint trains on
        # the batches the interrupted one had not reached, in the same order
        if hp.tbptt:
            return ResumableLoader(Streams(corpus, hp.seq_len, hp.batch_size), batch_size=None, trainer=self.trainer,
                                   num_workers=hp.num_workers)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        ds = RandomWindows(corpus, hp.seq_len, hp.samples_per_epoch, seed=hp.seed + epoch)
        return ResumableLoader(ds, batch_size=hp.batch_size, trainer=self.trainer, num_workers=hp.num_workers)

    def val_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(Consecutive(self.corpus("val"), hp.seq_len, hp.val_tokens), batch_size=hp.batch_size)

    def test_dataloader(self) -> DataLoader:
        hp = self.hparams
        return DataLoader(Consecutive(self.corpus("test"), hp.seq_len), batch_size=hp.batch_size)
