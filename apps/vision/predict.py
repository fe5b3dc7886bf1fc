"""Classify image files with a trained model: top-k classes as a table or JSON.

    python -m apps.vision.predict IMAGE [IMAGE ...]                    # runs/vision/pretrained, else the shipped model
    python -m apps.vision.predict --ckpt DIR_OR_FILE --top-k 3 --json photos/*.jpg
    python -m apps.vision.predict --ckpt vim_t_midclstok_76p1acc.pth cat.jpg  # hustvl ImageNet weights, 1000 classes

Each image gets the checkpoint's own preprocessing (size, centre crop, interpolation, mean / std, channels).
An unreadable image is reported by name and skipped; the exit status is 1 if any image failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config
from torch import nn

from apps.common.errors import run_cli
from apps.vision.data import BadImageError, build_transforms, load_image
from apps.vision.evaluate import resolve_checkpoint
from apps.vision.model import load_vision_model

__all__ = ["Predictor", "class_names_for", "pretty", "main"]


def pretty(name: str) -> str:
    """'3_dress' -> 'dress'; 'n01440764' stays; underscores become spaces."""
    head, sep, rest = name.partition("_")
    return (rest if sep and head.isdigit() else name).replace("_", " ")


def class_names_for(model: nn.Module, cfg: dict) -> list[str]:
    n = getattr(model, "num_classes", 0)
    if cfg.get("class_names"):
        return [pretty(c) for c in cfg["class_names"]]
    if n == 1000:  # an ImageNet-1k head (hustvl, timm): WNID order, with timm's descriptions
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(n)]


class Predictor:
    """A loaded classifier with its preprocessing: ``topk(images)``, ``saliency(image)``."""

    def __init__(self, ckpt: str | Path | None = None):
        self.ckpt = resolve_checkpoint(str(ckpt) if ckpt else None)
        self.model, self.cfg = load_vision_model(self.ckpt)
        self.data_config = resolve_data_config({}, model=self.model)
        self.transform = build_transforms(self.data_config, training=False)
        self.channels = self.data_config["input_size"][0]
        self.classes = class_names_for(self.model, self.cfg)

    def tensor(self, image: Image.Image | str | Path) -> torch.Tensor:
        """A PIL image or a file -> the model's input (1, C, H, W); BadImageError names a bad file."""
        from apps.vision.data import convert_mode

        img = load_image(image, self.channels) if not isinstance(image, Image.Image) else convert_mode(
            image, self.channels)
        return self.transform(img).unsqueeze(0)

    @torch.no_grad()
    def topk(self, images: list, k: int = 5) -> list[list[tuple[str, float]]]:
        x = torch.cat([self.tensor(im) for im in images])
        probs = self.model(x).float().softmax(-1)
        p, i = probs.topk(min(k, probs.shape[-1]), dim=-1)
        return [[(self.classes[j], float(q)) for q, j in zip(pr, ix)] for pr, ix in zip(p.tolist(), i.tolist())]

    def saliency(self, image, target: int | None = None, smooth: float = 1.0) -> tuple[np.ndarray, int]:
        """Gradient saliency: |d logit_target / d input pixel|, max over colour channels, Gaussian-smoothed and
        scaled to [0, 1], at the model's input resolution. Returns (map (H, W), target class index)."""
        x = self.tensor(image).requires_grad_(True)
        logits = self.model(x)
        target = int(logits.argmax(-1)) if target is None else int(target)
        (grad,) = torch.autograd.grad(logits[0, target], x)
        sal = grad.abs().amax(1, keepdim=True)  # (1, 1, H, W)
        if smooth > 0:
            r = max(1, int(round(2 * smooth)))
            t = torch.arange(-r, r + 1, dtype=sal.dtype)
            g = torch.exp(-t**2 / (2 * smooth**2))
            g = g / g.sum()
            sal = F.conv2d(F.pad(sal, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))
            sal = F.conv2d(F.pad(sal, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
        sal = sal[0, 0]
        sal = (sal - sal.min()) / (sal.max() - sal.min()).clamp_min(1e-12)
        return sal.detach().numpy(), target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+")
    p.add_argument("--ckpt", help="checkpoint folder, hustvl .pth or Lightning .ckpt")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    pred = Predictor(a.ckpt)
    results, failed = {}, 0
    for path in a.images:
        try:
            results[path] = pred.topk([path], a.top_k)[0]
        except (BadImageError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    if a.json:
        print(json.dumps({k: [{"class": c, "probability": round(q, 6)} for c, q in v] for k, v in results.items()},
                         indent=2))
    else:
        width = max((len(k) for k in results), default=5)
        print(f"{'image':<{width}}  " + "  ".join(f"top-{i + 1:<20}" for i in range(a.top_k)))
        for k, v in results.items():
            print(f"{k:<{width}}  " + "  ".join(f"{c[:14]:<14} {q:5.3f}" for c, q in v))
        print(f"(checkpoint: {pred.ckpt})")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
