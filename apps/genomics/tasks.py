"""Labelled DNA sets for fine-tuning: a TSV reader and a LightningDataModule for sequence classification.

File format (what ``datasets/recipes/splice.py`` and ``genus.py`` write; plain or .gz), tab-separated, a header:

    split   label   id      sequence
    train   EI      row1    ACGT...

``split`` is train / val / test. Sequences of different lengths are right-padded with [PAD] and carry
``lengths``; ``crop`` cuts long windows (random offset in training, centred otherwise) so CPU runs stay short;
``eval_crop`` sets the evaluation window separately (0: the whole sequence).

``FinetuneClassifier`` is the module ``python -m apps.genomics.finetune`` trains: ``model.DNAClassifier`` plus
label smoothing and optional strand averaging at evaluation (the mean of the log-probabilities of a sequence and
of its reverse complement; only for labels that do not depend on the strand, e.g. genus, never splice junctions).
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

from apps.common.paths import REPO_ROOT, SAMPLES, repo_path
from apps.genomics.data import PAD_ID, encode, reverse_complement_ids
from apps.genomics.model import DNAClassifier, rc_ids
from ssm_core import MambaConfig

__all__ = ["LabelledSet", "read_labelled_tsv", "LabelledDNADataModule", "FinetuneClassifier", "SPLICE_SAMPLE",
           "GENUS_SAMPLE", "collate"]

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
        recipe = REPO_ROOT / "datasets" / "recipes" / f"{path.parent.name}.py"  # datasets/genus/... <- genus.py
        if recipe.is_file():
            hint = f" (make it with python datasets/recipes/{recipe.name} --out {path}; options: the config naming it)"
        elif "datasets" in str(path):
            hint = " (make it with datasets/recipes/*.py)"
        else:
            hint = ""
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
    training sequences (a strand symmetry the rcps backbone has built in). ``eval_crop``: the window that
    validation and test read (None: ``crop``; 0: the whole sequence). ``limit_train``: use only the first n
    training rows (quick runs, tests). ``train_path``: read the training rows from this TSV instead (its other
    splits are ignored), validation and test still from ``path``: a larger training sample drawn by a recipe
    (``datasets/recipes/genus.py --splits train``) against the same held-out test rows.
    """

    def __init__(self, path: str = str(SPLICE_SAMPLE), labels: list[str] | None = None, batch_size: int = 32,
                 eval_batch_size: int = 64, crop: int | None = None, rc_augment: bool = False,
                 limit_train: int | None = None, num_workers: int = 0, seed: int = 0,
                 eval_crop: int | None = None, train_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.path = repo_path(path)
        self.train_path = repo_path(train_path) if train_path else None
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
        if self.train_path is not None:
            extra = read_labelled_tsv(self.train_path)["train"]
            missing = sorted(set(extra.labels) ^ set(self.sets["train"].labels))
            if missing:  # a label only one file has: a different task, or a typo
                raise ValueError(f"{self.train_path}: training labels differ from {self.path}'s in {missing}")
            self.sets["train"] = extra
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
        crop = hp.crop if train or hp.eval_crop is None else (hp.eval_crop or None)
        ds = _Split(data, {lab: i for i, lab in enumerate(self._labels)}, crop, train, hp.rc_augment, hp.seed)
        return DataLoader(ds, batch_size=hp.batch_size if train else hp.eval_batch_size, shuffle=train,
                          collate_fn=collate, num_workers=hp.num_workers,
                          generator=torch.Generator().manual_seed(hp.seed) if train else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class FinetuneClassifier(DNAClassifier):
    """``DNAClassifier`` with the fine-tuning recipe's two extra knobs (the finetune YAML's ``model:`` section).

    label_smoothing: cross-entropy label smoothing on the training labels (validation and test report accuracy,
    which it does not change). strand_average: in evaluation (``not self.training``: validation, test, predict)
    the output is the mean of the log-probabilities of each sequence and of its reverse complement, so the
    prediction cannot depend on which strand a window was read from. Only for strand-free labels (genus of
    origin); splice-junction labels (EI / IE) name a strand, and the reverse complement of a donor is not a donor.
    Training is unchanged (use ``data.rc_augment`` there). The exported network (``model``) is the plain
    DNAModel; ``strand_average_logits`` applies the same averaging to any DNAModel.
    """

    def __init__(self, config: MambaConfig, num_labels: int, backbone: str = "bimamba", task: str = "sequence",
                 pooling: str = "mean", labels: list[str] | None = None, dropout: float = 0.1, lr: float = 2e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 init_from: str | None = None, label_smoothing: float = 0.0, strand_average: bool = False,
                 center_window: int = 0):
        if init_from:  # the configs name the shipped assets/dna_small repo-relative: found from any folder
            init_from = str(repo_path(init_from))
        super().__init__(config, num_labels, backbone=backbone, task=task, pooling=pooling, labels=labels,
                         dropout=dropout, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, init_from=init_from, center_window=center_window)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if strand_average and task != "sequence":
            raise ValueError("strand_average is for sequence labels (task: sequence); per-base outputs would "
                             "need flipping back")
        self.label_smoothing = label_smoothing
        self.strand_average = strand_average
        self.save_hyperparameters()

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.strand_average and not self.training:
            return strand_average_logits(self.model, inputs, lengths)
        return super().forward(inputs, lengths)


def strand_average_logits(model: torch.nn.Module, input_ids: Tensor, lengths: Tensor | None = None) -> Tensor:
    """(log_softmax(model(x)) + log_softmax(model(rc x))) / 2 for a sequence classifier; padded rows are
    reverse-complemented inside their own length."""
    fwd = model(input_ids, lengths).float().log_softmax(-1)
    rev = model(rc_ids(input_ids, lengths), lengths).float().log_softmax(-1)
    return (fwd + rev) / 2
