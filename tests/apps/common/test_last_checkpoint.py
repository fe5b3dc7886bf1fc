"""apps.common.LastCheckpoint (last.ckpt always advances, atomically) and apps.common.data.ResumableLoader (a
resumed run continues mid-epoch), on a toy regression in-process; issue 16, item 2. The kill -9 test on a real
app is tests/apps/genomics/test_genomics_resume.py."""

from __future__ import annotations

import time
import types
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import Dataset

from apps.common import LastCheckpoint, ResumableLoader
from apps.common.checkpoint import read_lightning_checkpoint
from apps.common.paths import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


class Items(Dataset):
    """Item i of epoch e depends on (e, i) only; records what was read."""

    def __init__(self, n: int = 12):
        self.n, self.epoch, self.read = n, 0, []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.read.append((self.epoch, i))
        g = torch.Generator().manual_seed(1000 * self.epoch + i)
        return torch.randn(4, generator=g), torch.tensor([float(i)])


class Regression(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 1)
        self.seen: list[tuple[int, int, float]] = []  # (epoch, global_step, first input value)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((self.current_epoch, self.global_step, float(x[0, 0])))
        loss = ((self.net(x) - y) ** 2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(1.0))  # never improves: a monitored ModelCheckpoint saves once

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Data(pl.LightningDataModule):
    def __init__(self):
        super().__init__()
        self.train_set = Items()

    def train_dataloader(self):
        return ResumableLoader(self.train_set, batch_size=3, trainer=self.trainer)  # 4 batches per epoch

    def val_dataloader(self):
        return torch.utils.data.DataLoader(Items(3), batch_size=3)


def fit(root: Path, max_steps: int, every: int = 3, ckpt_path: str | None = None, callbacks=()):
    torch.manual_seed(0)
    model, data = Regression(), Data()
    last = LastCheckpoint(every_n_train_steps=every)
    trainer = pl.Trainer(default_root_dir=root, max_steps=max_steps, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[ModelCheckpoint(monitor="val/loss", save_on_train_epoch_end=False), last,
                                    *callbacks])
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return trainer, model, data, last


def ckpt_step(path: Path) -> int:
    return read_lightning_checkpoint(path)["global_step"]


class Record(pl.Callback):
    """Which step last.ckpt holds before each batch (Lightning runs Checkpoint callbacks' hooks after the
    others', so the file is read at the next batch's start)."""

    def __init__(self, path: Path):
        self.path, self.steps = path, []

    def on_train_batch_start(self, trainer, *args):
        self.steps.append(ckpt_step(self.path) if self.path.exists() else None)


def test_last_checkpoint_advances_every_n_steps_and_at_the_end(tmp_path):
    rec = Record(tmp_path / "checkpoints" / "last.ckpt")
    trainer, *_, last = fit(tmp_path, max_steps=7, every=3, callbacks=[rec])
    assert last.path == tmp_path / "checkpoints" / "last.ckpt"
    # before batches 1..7: nothing, nothing, nothing, step 3, 3, 3, step 6; then step 7 when training ends
    assert rec.steps == [None, None, None, 3, 3, 3, 6]
    assert ckpt_step(last.path) == trainer.global_step == 7
    # the monitored ModelCheckpoint kept only its best (the first validation) and no last.ckpt of its own
    best = trainer.checkpoint_callback
    assert isinstance(best, ModelCheckpoint) and Path(best.best_model_path).name == "epoch=0-step=4.ckpt"
    assert sorted(p.name for p in last.path.parent.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]


def test_resumed_mid_epoch_reads_the_batches_not_yet_trained_on(tmp_path):
    """A run resumed from step 6 (epoch 1, batch 2 of 4) trains on exactly what the uninterrupted run did next."""
    _, whole, *_ = fit(tmp_path / "whole", max_steps=10)
    _, first, *_ = fit(tmp_path / "cut", max_steps=6)
    ckpt = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert ckpt_step(ckpt) == 6
    trainer, resumed, data, _ = fit(tmp_path / "resumed", max_steps=10, ckpt_path=str(ckpt))
    assert resumed.seen == whole.seen[6:]  # same epochs, steps and inputs, in order
    assert [i for e, i in data.train_set.read[:2]] == [6, 7]  # the skipped batches were never loaded
    for a, b in zip(resumed.net.parameters(), whole.net.parameters()):
        assert torch.equal(a, b)
    assert trainer.train_dataloader.resumed_at == 2


def test_resumable_loader_state_rules():
    class Trainer:  # what ResumableLoader reads of a Trainer
        current_epoch = 1

        class fit_loop:
            class epoch_loop:
                class batch_progress:
                    class current:
                        ready = 2

    data = Items(12)
    loader = ResumableLoader(data, batch_size=3, trainer=Trainer)
    assert loader.state_dict() == {"epoch": 1, "batches": 2}
    loader.load_state_dict({"epoch": 1, "batches": 2})
    assert loader.resumed_at == 2 and len(loader) == 4
    assert [int(y[0, 0]) for _, y in loader] == [6, 9]       # the first pass after a resume starts at batch 3
    assert [int(y[0, 0]) for _, y in loader] == [0, 3, 6, 9]  # later passes are whole
    for stale in ({"epoch": 0, "batches": 2}, {"epoch": 1, "batches": 4}, {}):  # another epoch, an epoch's end
        loader.load_state_dict(stale)
        assert loader.resumed_at == 0 and [int(y[0, 0]) for _, y in loader] == [0, 3, 6, 9]
    loader.sampler.set_epoch(5)
    assert data.epoch == 5  # set_epoch reaches the dataset
    with pytest.raises(TypeError, match="shuffle"):
        ResumableLoader(data, batch_size=3, shuffle=True)
    items = ResumableLoader(data, batch_size=None)  # unbatched (a dataset whose items are batches)
    items.load_state_dict({"epoch": 0, "batches": 10})
    assert [int(y[0]) for _, y in items] == [10, 11]


def test_failed_save_leaves_the_previous_last_checkpoint(tmp_path, monkeypatch):
    """A save that dies midway (disk full, kill) leaves the old last.ckpt byte for byte; a failed one no temp."""

    class FailAt(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 4:  # the save at step 6 writes half a file, then fails
                real = trainer.save_checkpoint

                def half(path, *a, **k):
                    real(path, *a, **k)
                    data = Path(path).read_bytes()
                    Path(path).write_bytes(data[: len(data) // 2])
                    raise OSError(28, "No space left on device")

                monkeypatch.setattr(trainer, "save_checkpoint", half)

    with pytest.raises(OSError, match="No space left"):
        fit(tmp_path, max_steps=9, callbacks=[FailAt()])
    folder = tmp_path / "checkpoints"
    assert ckpt_step(folder / "last.ckpt") == 3
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("kwargs, says", [
    ({"every_n_train_steps": 0}, "every_n_train_steps must be a positive int"),
    ({"every_minutes": -1}, "every_minutes must be positive"),
    ({"filename": "a/b.ckpt"}, "filename must be a file name"),
])
def test_bad_arguments(kwargs, says):
    with pytest.raises(ValueError, match=says):
        LastCheckpoint(**kwargs)


def test_every_minutes_alone(tmp_path, monkeypatch):
    clock = iter(range(0, 10_000, 40))  # 40 s more at each look at the clock, the callbacks' only
    monkeypatch.setattr("apps.common.callbacks.time",
                        types.SimpleNamespace(monotonic=lambda: next(clock), process_time=time.process_time))
    rec = Record(tmp_path / "checkpoints" / "last.ckpt")
    torch.manual_seed(0)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=5, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[LastCheckpoint(every_n_train_steps=None, every_minutes=1), rec])
    trainer.fit(Regression(), datamodule=Data())
    assert rec.steps[:3] == [None, None, 2]  # 80 s after the start: saved at step 2
    assert ckpt_step(tmp_path / "checkpoints" / "last.ckpt") == 5


APP_CONFIGS = sorted((REPO_ROOT / "apps" / "genomics" / "configs").glob("*.yaml")) + [
    REPO_ROOT / "apps" / "text" / "configs" / "default.yaml"]


@pytest.mark.parametrize("path", APP_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_every_app_config_keeps_an_advancing_last_checkpoint(path):
    """Every training config: a LastCheckpoint, and a monitored ModelCheckpoint (if any) for the best model only,
    saving when validation has run (save_on_train_epoch_end: false), never a save_last of its own."""
    callbacks = (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks")
    if callbacks is None:
        pytest.skip("inherits the callbacks of the config read before it")
    names = [c["class_path"] for c in callbacks]
    assert names.count("apps.common.LastCheckpoint") == 1, names
    for c in callbacks:
        if c["class_path"].endswith("ModelCheckpoint"):
            args = c.get("init_args") or {}
            assert "save_last" not in args and args.get("monitor") and args.get("save_on_train_epoch_end") is False
