"""Image data for Vim: torchvision ImageFolder trees, timm's transforms and Mixup/CutMix, robust image loading.

Layout: ``root/train/<class>/*.png|jpg|...`` plus optional ``root/val/`` and ``root/test/`` with the same class
folders (any number of classes). Without ``val/``, a seeded stratified ``val_frac`` of train is held out;
without ``test/``, the test split is the validation split (and the run says so).

Transforms are timm's (``timm.data.create_transform``): RandomResizedCrop + flip + RandAugment + random erasing
for training, resize + centre crop (``crop_pct``) for evaluation; Mixup / CutMix with label smoothing are timm's
``Mixup`` applied to each training batch after it reaches the device. Input size, channels, mean / std and
interpolation default to the model's ``pretrained_cfg`` (timm.data.resolve_data_config), so a Vim built for
28x28 grey images and one for 224x224 RGB read the same folders correctly.

Bad input never stops an epoch:
  * unreadable, truncated or zero-byte files, and images smaller than ``min_size`` px: with ``verify`` (default
    for up to 20,000 files) every image is decoded once at setup and bad ones are dropped with one warning that
    lists them; otherwise a bad file met during training is replaced by the next good sample and named in a
    warning (``BadImageWarning``). ``python -m apps.vision.data check DIR`` lists every bad file in a tree.
  * grey / RGBA / LA / palette / CMYK / 16-bit images are converted to the model's channels: alpha composited
    on white, CMYK via PIL, 16-bit scaled by 1/257 (not clipped), EXIF orientation applied.
  * a training class folder with no images, or a val/test class folder that train does not have, is an error
    naming the folders (a class the head would never see, or labels that do not line up).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from torch.utils.data import ConcatDataset, DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from apps.common.errors import run_cli
from apps.common.paths import repo_path

__all__ = ["ImageFolderDataModule", "RobustImageFolder", "BadImageError", "BadImageWarning", "load_image",
           "check_tree", "build_transforms", "IMG_EXTENSIONS"]

VERIFY_LIMIT = 20_000  # verify="auto" decodes every image at setup up to this many files
MIN_SIZE = 8


class BadImageError(ValueError):
    """An image file that cannot be used; the message names the file and why."""


class BadImageWarning(UserWarning):
    pass


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grey images -> mode L without clipping (PIL's convert('L') clips)."""
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or (a.size and a.max() <= 65535 and a.min() >= 0 and a.max() > 255):
        a = a / 257.0
    elif a.size and (a.min() < 0 or a.max() > 255):
        lo, hi = a.min(), a.max()
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")


def convert_mode(im: Image.Image, channels: int) -> Image.Image:
    """Any PIL mode -> 'L' (channels=1) or 'RGB' (channels=3)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    target = "L" if channels == 1 else "RGB"
    if channels not in (1, 3):
        raise ValueError(f"images can be read with 1 or 3 channels, not {channels}")
    return im if im.mode == target else im.convert(target)


def load_image(path: str | os.PathLike, channels: int = 3, min_size: int = MIN_SIZE) -> Image.Image:
    """Decode one image fully (so truncation is caught here), fix orientation and mode; BadImageError otherwise."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            im = convert_mode(im, channels)
    except BadImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImageError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    if min(im.size) < min_size:
        raise BadImageError(f"{path}: {im.size[0]}x{im.size[1]} px is smaller than min_size={min_size}")
    return im


class RobustImageFolder(ImageFolder):
    """torchvision ImageFolder with a fixed class list (val/test use train's), the robust loader above, and
    bad files skipped (replaced by the next good sample, with a warning naming the file) instead of raised."""

    def __init__(self, root: str | os.PathLike, transform=None, classes: Sequence[str] | None = None,
                 channels: int = 3, min_size: int = MIN_SIZE):
        self._fixed_classes = list(classes) if classes is not None else None
        self.channels, self.min_size = channels, min_size
        self.bad: dict[str, str] = {}
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        super().__init__(str(root), transform=transform, loader=self._load, allow_empty=classes is not None)

    def _load(self, path: str) -> Image.Image:
        return load_image(path, self.channels, self.min_size)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
        if self._fixed_classes is None:
            if not found:
                raise FileNotFoundError(f"{directory} has no class folders (expected {directory}/<class>/<images>)")
            empty = [c for c in found if not any(
                f.lower().endswith(IMG_EXTENSIONS) for _, _, fs in os.walk(Path(directory, c)) for f in fs)]
            if empty:
                raise ValueError(f"{directory}: class folder(s) with no images: {empty}. Remove them or add images "
                                 "(a class with no training images cannot be learned)")
            classes = found
        else:
            extra = sorted(set(found) - set(self._fixed_classes))
            if extra:
                raise ValueError(f"{directory}: class folder(s) {extra} are not among the training classes "
                                 f"{self._fixed_classes[:10]}{' ...' if len(self._fixed_classes) > 10 else ''}")
            classes = self._fixed_classes
        return classes, {c: i for i, c in enumerate(classes)}

    def verify(self) -> dict[str, str]:
        """Decode every image once; drop bad ones from ``samples``; return {path: reason} of those dropped."""
        from tqdm.auto import tqdm

        good, bad = [], {}
        for path, target in tqdm(self.samples, desc=f"checking {Path(self.root).name}/", leave=False,
                                 disable=len(self.samples) < 2000):
            try:
                self._load(path)
                good.append((path, target))
            except BadImageError as e:
                bad[path] = str(e)
        self.samples = self.imgs = good
        self.targets = [t for _, t in good]
        self.bad.update(bad)
        return bad

    def __getitem__(self, index: int):
        n = len(self.samples)
        if n == 0:
            raise IndexError(f"{self.root}: no usable images")
        for step in range(n):
            path, target = self.samples[(index + step) % n]
            try:
                img = self.loader(path)
            except BadImageError as e:
                if path not in self.bad:
                    self.bad[path] = str(e)
                    warnings.warn(f"skipping bad image (replaced by the next sample): {e}", BadImageWarning,
                                  stacklevel=2)
                continue
            if self.transform is not None:
                img = self.transform(img)
            return img, target
        raise RuntimeError(f"{self.root}: every image failed to load; first: {next(iter(self.bad.values()))}")


def check_tree(root: str | os.PathLike, channels: int = 3, min_size: int = MIN_SIZE) -> dict[str, str]:
    """{path: reason} for every unusable image under root/<class>/ (or root/<split>/<class>/)."""
    root = Path(root)
    splits = [root / s for s in ("train", "val", "test") if (root / s).is_dir()] or [root]
    bad = {}
    for s in splits:
        bad.update(RobustImageFolder(s, classes=None if s.name == "train" or s == root else
                                     sorted(d.name for d in s.iterdir() if d.is_dir()),
                                     channels=channels, min_size=min_size).verify())
    return bad


def build_transforms(data_config: dict, training: bool, auto_augment: str | None = "rand-m9-mstd0.5-inc1",
                     re_prob: float = 0.25, hflip: float = 0.5, scale: tuple[float, float] = (0.08, 1.0),
                     color_jitter: float | None = 0.3):
    """timm.data.create_transform with the model's data config (input size, interpolation, mean, std, crop)."""
    from timm.data import create_transform

    c, h, w = data_config["input_size"]
    kw = {"input_size": (c, h, w), "interpolation": data_config.get("interpolation", "bicubic"),
          "mean": tuple(data_config["mean"]), "std": tuple(data_config["std"])}
    if training:
        return create_transform(is_training=True, auto_augment=auto_augment or None, re_prob=re_prob, re_mode="pixel",
                                hflip=hflip, scale=tuple(scale), color_jitter=color_jitter or None, **kw)
    return create_transform(is_training=False, crop_pct=data_config.get("crop_pct", 0.875),
                            crop_mode=data_config.get("crop_mode", "center"), **kw)


def _collate(batch):
    x, y = torch.utils.data.default_collate(batch)
    return {"inputs": x, "labels": y}


class ImageFolderDataModule(pl.LightningDataModule):
    """Train / val / test loaders over an image-folder tree (see the module docstring).

    root: the tree. img_size / in_chans / mean / std / interpolation / crop_pct: None = the model's data config
    (the LightningModule's ``data_config``), or explicit. auto_augment: a timm RandAugment string or None.
    mixup / cutmix: timm Mixup alphas (0 disables); label_smoothing goes into Mixup's soft targets (or the loss
    when Mixup is off). verify: "auto" (decode every image at setup up to 20,000 files), True, False.
    train_on_val: also train on the val/ folder (the final model once a recipe is fixed, as Fashion-MNIST's
    published figures train on all 60,000 training images); validation then scores seen images, a sanity check only.
    """

    def __init__(self, root: str = "datasets/samples/fashion_mnist_small", batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int = 0, val_frac: float = 0.1,
                 img_size: int | None = None, in_chans: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, interpolation: str | None = None, crop_pct: float | None = None,
                 auto_augment: str | None = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25, hflip: float = 0.5,
                 scale: tuple[float, float] = (0.08, 1.0), color_jitter: float | None = 0.3, mixup: float = 0.8,
                 cutmix: float = 1.0, mixup_prob: float = 1.0, label_smoothing: float = 0.1,
                 verify: bool | str = "auto", min_size: int = MIN_SIZE, seed: int = 0, train_on_val: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.root = repo_path(root)  # repo-relative paths (the configs' datasets/samples/...) work from anywhere
        self.classes: list[str] | None = None
        self.mixup_fn = None
        self.model_data_config: dict | None = None  # set by evaluate/predict (no trainer): the model's data config
        self._setup_done = False

    # --- config -----------------------------------------------------------------------------------------------
    def data_config(self) -> dict:
        """The model's data config (when attached to a trainer) overridden by explicit arguments."""
        hp = self.hparams
        cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
               "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if self.model_data_config:
            cfg.update(self.model_data_config)
        elif module is not None and getattr(module, "data_config", None):
            cfg.update(module.data_config)
        c, h, w = cfg["input_size"]
        if hp.in_chans is not None:
            c = hp.in_chans
        if hp.img_size is not None:
            h = w = hp.img_size
        cfg["input_size"] = (c, h, w)
        for k in ("mean", "std", "interpolation", "crop_pct"):
            if getattr(hp, k) is not None:
                cfg[k] = tuple(getattr(hp, k)) if k in ("mean", "std") else getattr(hp, k)
        if len(cfg["mean"]) != c:
            cfg["mean"] = (float(np.mean(cfg["mean"])),) * c
            cfg["std"] = (float(np.mean(cfg["std"])),) * c
        return cfg

    # --- datasets ---------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None):
        if self._setup_done:
            return
        hp = self.hparams
        if not (self.root / "train").is_dir():
            raise FileNotFoundError(
                f"{self.root}/train not found: expected {self.root}/train/<class>/<images> (and optional val/, "
                "test/). Build one with datasets/recipes/fashion_mnist.py or datasets/recipes/imagenet_subset.py")
        cfg = self.data_config()
        self.cfg = cfg
        channels = cfg["input_size"][0]
        tf_train = build_transforms(cfg, True, hp.auto_augment, hp.re_prob, hp.hflip, hp.scale, hp.color_jitter)
        tf_eval = build_transforms(cfg, False)
        train_aug = RobustImageFolder(self.root / "train", tf_train, channels=channels, min_size=hp.min_size)
        self.classes = train_aug.classes
        others = {split: RobustImageFolder(self.root / split, tf_eval, classes=self.classes, channels=channels,
                                           min_size=hp.min_size)
                  for split in ("val", "test") if (self.root / split).is_dir()}
        folders = [train_aug, *others.values()]
        if hp.verify is True or (hp.verify == "auto" and sum(len(d.samples) for d in folders) <= VERIFY_LIMIT):
            bad = {}
            for d in folders:
                bad.update(d.verify())
            if bad:
                listing = "\n  ".join(list(bad.values())[:20])
                warnings.warn(f"{len(bad)} bad image(s) dropped:\n  {listing}" + ("\n  ..." if len(bad) > 20 else ""),
                              BadImageWarning, stacklevel=2)
        train_plain = copy.copy(train_aug)  # same files, evaluation transform (the held-out slice of train)
        train_plain.transform = tf_eval
        if "val" in others:
            train_idx, val = list(range(len(train_aug))), others["val"]
        else:
            train_idx, val_idx = _stratified_split(train_aug.targets, hp.val_frac, hp.seed)
            val = Subset(train_plain, val_idx)
        test = others.get("test")
        self.train_set = Subset(train_aug, train_idx)
        if hp.train_on_val:
            if "val" not in others:
                raise ValueError(f"train_on_val: {self.root}/val not found (it adds that folder to training; without "
                                 "one, train on everything with val_frac instead)")
            val_aug = copy.copy(others["val"])  # same files, training transform
            val_aug.transform = tf_train
            self.train_set = ConcatDataset([self.train_set, val_aug])
        self.val_set = val
        self.test_set = test if test is not None else val
        self.test_is_val = test is None
        if len(self.train_set) < 2:
            raise ValueError(f"{self.root}/train: {len(self.train_set)} usable image(s); need at least 2")
        self._setup_done = True
        if (hp.mixup > 0 or hp.cutmix > 0) and hp.mixup_prob > 0:
            from timm.data import Mixup

            self.mixup_fn = Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                                  label_smoothing=hp.label_smoothing, num_classes=len(self.classes))

    @property
    def labels(self) -> list[str] | None:
        """Class names in label order (apps.common.ClassifierModule checks them against the head)."""
        return self.classes

    @property
    def num_classes(self) -> int:
        if self.classes is None:
            raise RuntimeError("call setup() first")
        return len(self.classes)

    def _loader(self, ds, train: bool) -> DataLoader:
        hp = self.hparams
        bs = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        drop_last = train and self.mixup_fn is not None and len(ds) >= bs  # timm Mixup needs even batches
        return DataLoader(ds, batch_size=bs, shuffle=train, num_workers=hp.num_workers, collate_fn=_collate,
                          drop_last=drop_last, persistent_workers=hp.num_workers > 0,
                          generator=torch.Generator().manual_seed(hp.seed) if train else None)

    def train_dataloader(self):
        return self._loader(self.train_set, True)

    def val_dataloader(self):
        return self._loader(self.val_set, False)

    def test_dataloader(self):
        return self._loader(self.test_set, False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """timm Mixup / CutMix on training batches only: labels become soft targets (batch, classes)."""
        trainer = self.trainer
        if self.mixup_fn is not None and trainer is not None and trainer.training and batch["inputs"].shape[0] % 2 == 0:
            batch["inputs"], batch["labels"] = self.mixup_fn(batch["inputs"], batch["labels"])
        return batch


def _stratified_split(targets: Sequence[int], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded per-class split: round(frac * n_class) (at least 1 when the class has 2+) held out per class."""
    rng = np.random.default_rng(seed)
    targets = np.asarray(targets)
    train, val = [], []
    for k in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == k))
        n_val = min(len(idx) - 1, max(1, math.floor(frac * len(idx) + 0.5))) if len(idx) > 1 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description="List unusable images in an image-folder tree")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="decode every image; print bad ones")
    c.add_argument("root")
    c.add_argument("--channels", type=int, default=3)
    c.add_argument("--min-size", type=int, default=MIN_SIZE)
    a = p.parse_args(argv)
    bad = check_tree(a.root, a.channels, a.min_size)
    for reason in bad.values():
        print(reason)
    print(f"{len(bad)} bad image(s) under {a.root}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
