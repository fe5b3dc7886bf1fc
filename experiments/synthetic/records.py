"""Where runs live and their JSON records: ``checkpoints/TASK_MODEL/`` holds the save_pretrained model,
``train.json`` (recipe, curve, wall time) and ``eval.json`` (accuracy per length)."""

from __future__ import annotations

import json
from pathlib import Path

from ssm_core import atomic_write

__all__ = ["CHECKPOINTS", "checkpoint_dir", "write_json", "load_records"]

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def checkpoint_dir(task: str, model: str, root: Path = CHECKPOINTS) -> Path:
    return root / f"{task}_{model}"


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(obj, indent=1) + "\n"))


def load_records(root: Path = CHECKPOINTS) -> tuple[dict, dict]:
    """({run name: train.json}, {run name: eval.json}) of every run folder under root, in name order."""
    train_rec, eval_rec = {}, {}
    for d in sorted(root.glob("*_*")):
        if (d / "train.json").exists():
            train_rec[d.name] = json.loads((d / "train.json").read_text())
        if (d / "eval.json").exists():
            eval_rec[d.name] = json.loads((d / "eval.json").read_text())
    return train_rec, eval_rec
