"""Fine-tune a trained model on any image folder: a new head for the folder's classes, optional layer-wise lr decay.

    python -m apps.vision.finetune --ckpt runs/vision/pretrained --data DIR            # our checkpoints
    python -m apps.vision.finetune --ckpt vim_t_midclstok_76p1acc.pth --data datasets/imagenette \\
        --img-size 224 --layer-decay 0.75 --trainer.accelerator=gpu --trainer.max_epochs=30   # hustvl's weights
    python -m apps.vision.finetune --ckpt ... --data ... --config apps/vision/configs/finetune.yaml --model.lr=1e-4

``--ckpt``: a folder written by apps.vision, a Lightning .ckpt of apps.vision.train, or a hustvl/Vim .pth (its
variant is read from the weights). ``--data``: an image-folder root (train/ [val/ test/]); the class count is
read from its train/ folders. The architecture comes from the checkpoint; ``--img-size`` / ``--stride``
resample the position embedding (bicubic, the middle class token kept in place). Every other option is a
LightningCLI option of apps.vision.train (configs/finetune.yaml is read first).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.common.paths import repo_path
from apps.vision.classifier import VisionClassifier
from apps.vision.data import ImageFolderDataModule, RobustImageFolder
from apps.vision.model import read_any

FINETUNE_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune.yaml"


def finetune_args(ckpt: str, data: str, img_size: int | None = None, stride: int | None = None,
                  layer_decay: float | None = None, ema: bool = False) -> list[str]:
    """The LightningCLI arguments that start apps.vision.train from ``ckpt`` on the folder ``data``."""
    root = repo_path(data)
    classes = RobustImageFolder(root / "train").classes if (root / "train").is_dir() else None
    if classes is None:
        raise FileNotFoundError(f"{root}/train not found: --data needs train/<class>/<images>")
    _, cfg = read_any(ckpt, use_ema=ema)
    kwargs = {k: v for k, v in cfg["model_kwargs"].items() if k != "num_classes"}
    if img_size:
        kwargs["img_size"] = img_size
    if stride:
        kwargs["stride"] = stride
    args = [f"--model.model_name={cfg['model']}", f"--model.model_kwargs={json.dumps(kwargs)}",
            f"--model.num_classes={len(classes)}", f"--model.init_from={ckpt}", "--model.new_head=true",
            f"--data.root={root}"]
    if ema:
        args.append("--model.init_use_ema=true")
    if layer_decay:
        args.append(f"--model.layer_decay={layer_decay}")
    return args


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--img-size", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--layer-decay", type=float)
    p.add_argument("--ema", action="store_true", help="hustvl .pth: start from model_ema")
    a, rest = p.parse_known_args(argv)
    args = finetune_args(a.ckpt, a.data, a.img_size, a.stride, a.layer_decay, a.ema)
    sub = [rest.pop(0)] if rest and rest[0] in ("fit", "validate", "test") else ["fit"]
    return cli_main(VisionClassifier, ImageFolderDataModule, FINETUNE_CONFIG, args=[*sub, *args, *rest])


if __name__ == "__main__":
    run_cli(main)
