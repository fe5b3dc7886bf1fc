"""kill -9 mid-training, then resume (issue 16, item 2): python -m apps.genomics.train with the shipped config's
checkpoint callbacks is SIGKILLed mid-epoch; resumed with --ckpt_path <log_dir>/checkpoints/last.ckpt it loses at
most one checkpoint interval, and its per-step train loss (CSV metrics) equals an uninterrupted run's, bit for bit,
from the resume point on (same windows in the same order, mid-epoch, through the length warm-up)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from apps.common.checkpoint import read_lightning_checkpoint
from apps.genomics.train import DEFAULT_CONFIG
from apps.genomics.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[3]
EVERY, KILL_AT, MAX_STEPS = 3, 7, 12
# 4 steps per epoch (windows of 16, 32, then 64 bases): step 6 is mid-way through epoch 1, step 8 its end
TINY = ["--model.config.d_model=32", "--model.config.n_layer=1", "--data.seq_len=64", "--data.batch_size=2",
        "--data.samples_per_epoch=8", "--data.warmup_min_len=16", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--data.eval_batch_size=64", "--trainer.limit_val_batches=2", f"--trainer.max_steps={MAX_STEPS}"]

KILLED = textwrap.dedent("""
    import os, signal, sys
    import pytorch_lightning as pl
    import torch
    from apps.common.cli import cli_main
    from apps.genomics.data import DNADataModule
    from apps.genomics.model import DNALM
    from apps.genomics.train import DEFAULT_CONFIG

    class KillAt(pl.Callback):  # a kill -9 from outside, at a step chosen so the test is deterministic
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == int(os.environ["KILL_AT"]):
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    cli_main(DNALM, DNADataModule, DEFAULT_CONFIG, sys.argv[1:], trainer_defaults={"callbacks": [KillAt()]})
""")


def checkpoint_callbacks(path: Path) -> Path:
    """The shipped default.yaml's checkpoint callbacks (best by validation + LastCheckpoint), every EVERY steps;
    the export and held-out evaluation are left out (not what is tested, and they take time)."""
    callbacks = yaml.safe_load(DEFAULT_CONFIG.read_text())["trainer"]["callbacks"]
    kept = [c for c in callbacks if c["class_path"].endswith(("ModelCheckpoint", "LastCheckpoint"))]
    assert len(kept) == 2
    for c in kept:
        if c["class_path"].endswith("LastCheckpoint"):
            c["init_args"]["every_n_train_steps"] = EVERY
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": kept}}))
    return path


def losses(run: Path) -> dict[int, dict[str, str]]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    out: dict[int, dict[str, str]] = {}
    for r in rows:
        out.setdefault(int(r["step"]), {}).update({k: v for k, v in r.items() if v and k != "step"})
    return out


def test_kill_9_mid_epoch_then_resume_continues_the_loss_curve(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*TINY, "--config", str(checkpoint_callbacks(tmp_path / "ckpt.yaml"))]
    runs = tmp_path / "runs" / "genomics"

    whole = train_main(args)  # version_0: the uninterrupted run
    assert whole.trainer.global_step == MAX_STEPS

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT": str(KILL_AT)}
    res = subprocess.run([sys.executable, "-c", KILLED, *args], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    last = runs / "version_1" / "checkpoints" / "last.ckpt"
    saved = read_lightning_checkpoint(last)
    lost = KILL_AT - saved["global_step"]
    assert saved["global_step"] == 6 and 0 < lost <= EVERY  # at most one interval lost
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]

    resumed = train_main([*args, f"--ckpt_path={last}"])  # version_2
    assert resumed.trainer.global_step == MAX_STEPS
    want, got = losses(runs / "version_0"), losses(runs / "version_2")
    steps = sorted(got)
    assert steps[0] == 6 and steps[-1] == MAX_STEPS - 1  # logged steps are 0-based: the 7th step onwards
    for step in steps:
        row = got[step]
        assert {k: want[step].get(k) for k in row} == row, f"step {step}"  # every value, bit for bit
    assert [got[s]["train/seq_len"] for s in steps if "train/seq_len" in got[s]] == ["32.0", "32.0"] + ["64.0"] * 4
    assert sum("val/bits_per_base" in got[s] for s in steps) == 2  # the ends of epochs 1 and 2, equal too
