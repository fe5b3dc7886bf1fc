"""Train an image classifier (LightningCLI; configs/default.yaml is read first).

    python -m apps.vision.train                         # a small Vim on the bundled Fashion-MNIST sample, CPU, minutes
    python -m apps.vision.train --trainer.max_epochs=5 --data.root=DIR          # any image folder (train/ [val/ test/])
    python -m apps.vision.train --config apps/vision/configs/fashion_mnist.yaml # the full set (recipe-built)
    python -m apps.vision.train --config apps/vision/configs/deit_baseline.yaml # timm's DeiT, same data and budget
    python -m apps.vision.train --config apps/vision/configs/imagenet_vim_tiny.yaml   # hustvl/DeiT recipe, GPUs

Writes Lightning checkpoints and CSV logs under runs/vision/, the model to runs/vision/pretrained
(apps.vision.classifier.ExportVisionModel), then prints the held-out top-1 / top-5 of the test split
(apps.vision.evaluate.HeldOutTop1).
"""

from __future__ import annotations

from pathlib import Path

from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.vision.classifier import VisionClassifier
from apps.vision.data import ImageFolderDataModule

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main(args: list[str] | None = None):
    return cli_main(VisionClassifier, ImageFolderDataModule, DEFAULT_CONFIG, args=args)


if __name__ == "__main__":
    run_cli(main)
