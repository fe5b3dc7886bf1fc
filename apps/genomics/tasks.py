"""Labelled DNA sets for fine-tuning: a TSV reader and a LightningDataModule for sequence classification.

File format (what ``datasets/recipes/splice.py`` and ``genus.py`` write; plain or .gz), tab-separated, a header:

    split   label   id      sequence
    train   EI      row1    ACGT...

``split`` is train / val / test. Sequences of different lengths are right-padded with [PAD] and carry
``lengths``; ``crop`` cuts long windows (random offset in training, centred otherwise) so CPU runs stay short.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from apps.common.paths import SAMPLES, repo_path
from apps.genomics.data import PAD_ID, encode, reverse_complement_ids

__all__ = ["LabelledSet", "read_labelled_tsv", "LabelledDNADataModule", "SPLICE_SAMPLE", "GENUS_SAMPLE", "collate"]

SPLICE_SAMPLE = SAMPLES / "splice_uci.tsv.gz"
GENUS_SAMPLE = SAMPLES / "genus_windows.tsv.gz"
SPLITS = ("train", "val", "test")
HEADER = ["split", "label", "id", "sequence"]


@dataclass
class LabelledSet:
    ids: list[str]
    labels: list[str]
    tokens: list[Tensor]  # each (L_i,) long


def read_labelled_tsv(path: str | os.PathLike) -> dict[str, LabelledSet]:
    """{split: LabelledSet}; a malformed line raises ValueError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        hint = " (make it with datasets/recipes/*.py)" if "datasets" in str(path) else ""
        raise FileNotFoundError(f"labelled data not found: {path}{hint}")
    out = {s: LabelledSet([], [], []) for s in SPLITS}
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != HEADER:
            raise ValueError(f"{path}:1: header must be {'<tab>'.join(HEADER)}, got {'<tab>'.join(header)}")
        for n, line in enumerate(f, 2):
            if not line.strip():
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 4:
                raise ValueError(f"{path}:{n}: expected 4 tab-separated columns, got {len(cols)}")
            split, label, sid, seq = cols
            if split not in out:
                raise ValueError(f"{path}:{n}: split {split!r} is not one of {SPLITS}")
            if not seq:
                raise ValueError(f"{path}:{n}: empty sequence")
            s = out[split]
            s.ids.append(sid)
            s.labels.append(label)
            s.tokens.append(encode(seq, where=f"{path}:{n}"))
    if not out["train"].ids:
        raise ValueError(f"{path}: no training rows")
    return out


class _Split(Dataset):
    def __init__(self, data: LabelledSet, label_ids: dict[str, int], crop: int | None, train: bool,
                 rc_augment: bool, seed: int):
        self.data, self.label_ids, self.crop, self.train, self.rc_augment = data, label_ids, crop, train, rc_augment
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.data.ids)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.data.tokens[i]
        if self.crop and len(x) > self.crop:
            start = (int(torch.randint(0, len(x) - self.crop + 1, (1,), generator=self.gen)) if self.train
                     else (len(x) - self.crop) // 2)
            x = x[start: start + self.crop]
        if self.train and self.rc_augment and bool(torch.rand(1, generator=self.gen) < 0.5):
            x = reverse_complement_ids(x)
        return x, self.label_ids[self.data.labels[i]]


def collate(items: list[tuple[Tensor, int]]) -> dict[str, Tensor]:
    """-> input_ids (batch, L_max) right-padded with [PAD], lengths (batch,), labels (batch,)."""
    lengths = torch.tensor([len(x) for x, _ in items])
    ids = torch.full((len(items), int(lengths.max())), PAD_ID, dtype=torch.long)
    for b, (x, _) in enumerate(items):
        ids[b, : len(x)] = x
    return {"input_ids": ids, "lengths": lengths, "labels": torch.tensor([y for _, y in items])}


class LabelledDNADataModule(pl.LightningDataModule):
    """Train/val/test loaders over a labelled TSV (default: the bundled splice-junction set).

    labels: class names in id order (default: sorted names found in the file). crop: cut sequences longer than
    this (random window in training, centre window in evaluation). rc_augment: reverse-complement half of the
    training sequences (a strand symmetry the rcps backbone has built in). ``limit_train``: use only the first
    n training rows (quick runs, tests).
    """

    def __init__(self, path: str = str(SPLICE_SAMPLE), labels: list[str] | None = None, batch_size: int = 32,
                 eval_batch_size: int = 64, crop: int | None = None, rc_augment: bool = False,
                 limit_train: int | None = None, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.path = repo_path(path)
        self._labels = list(labels) if labels else None
        self.sets: dict[str, LabelledSet] | None = None

    @property
    def labels(self) -> list[str]:
        self._load()
        return self._labels

    def _load(self) -> None:
        if self.sets is not None:
            return
        self.sets = read_labelled_tsv(self.path)
        found = sorted({lab for s in self.sets.values() for lab in s.labels})
        if self._labels is None:
            self._labels = found
        unknown = sorted(set(found) - set(self._labels))
        if unknown:
            raise ValueError(f"{self.path}: labels {unknown} are not among the configured {self._labels}")
        if self.hparams.limit_train:
            t = self.sets["train"]
            n = self.hparams.limit_train
            self.sets["train"] = LabelledSet(t.ids[:n], t.labels[:n], t.tokens[:n])

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _loader(self, split: str, train: bool) -> DataLoader:
        self._load()
        data = self.sets[split]
        if not data.ids:
            raise ValueError(f"{self.path}: no rows with split {split!r}")
        hp = self.hparams
        ds = _Split(data, {lab: i for i, lab in enumerate(self._labels)}, hp.crop, train, hp.rc_augment, hp.seed)
        return DataLoader(ds, batch_size=hp.batch_size if train else hp.eval_batch_size, shuffle=train,
                          collate_fn=collate, num_workers=hp.num_workers,
                          generator=torch.Generator().manual_seed(hp.seed) if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
