"""Top-1 / top-5 accuracy and a confusion matrix of an image classifier on an image-folder split.

    python -m apps.vision.evaluate                                    # runs/vision/pretrained (else the shipped
                                                                      # model) on the bundled Fashion-MNIST test split
    python -m apps.vision.evaluate --ckpt DIR_OR_FILE --data ROOT --split test --plot confusion.png --json
    python -m apps.vision.evaluate --ckpt vim_t_midclstok_76p1acc.pth --data datasets/imagenette --split val \\
        --class-map imagenet                                         # a 1000-class model on an ImageNet subset

The checkpoint's class names must match the data's class folders (a clear error otherwise); a 1000-class
ImageNet model evaluated on a WNID-named subset is scored over the subset's classes with ``--class-map
imagenet`` (its logits restricted to those WNIDs' indices, as Imagenette / ImageNet-100 evaluations do).
Preprocessing is the checkpoint's own data config (size, crop, interpolation, mean / std).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from apps.common.callbacks import HeldOutEvaluation
from apps.common.errors import run_cli
from apps.common.paths import REPO_ROOT, repo_path
from apps.common.paths import resolve_checkpoint as common_resolve_checkpoint
from apps.vision.data import ImageFolderDataModule
from apps.vision.model import CheckpointError, load_vision_model

__all__ = ["evaluate", "HeldOutTop1", "resolve_checkpoint", "SHIPPED", "DEFAULT_DATA", "confusion_figure",
           "imagenet_wnids", "main"]

SHIPPED = Path(__file__).resolve().parent / "assets" / "vim_fashion_mnist"
DEFAULT_DATA = REPO_ROOT / "datasets" / "samples" / "fashion_mnist_small"
HOW_TO_TRAIN = "Train one with `python -m apps.vision.train` (or pass --ckpt DIR_OR_FILE)."


def resolve_checkpoint(ckpt: str | None) -> Path:
    """The named checkpoint (must exist), else runs/vision/pretrained, else the shipped model."""
    return common_resolve_checkpoint("vision", ckpt, SHIPPED, HOW_TO_TRAIN)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WNIDs in label order (timm's ImageNetInfo: sorted WNIDs, as hustvl/DeiT train)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo().label_names())


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, class_index: list[int] | None = None,
             progress: bool = True, flip_tta: bool = False) -> dict:
    """{"top1", "top5", "n", "confusion" (K, K) int array: rows true, columns predicted}. ``class_index``
    restricts the model's logits to those output indices (in the data's label order). ``flip_tta``: score each
    image and its mirror image and average the two softmax outputs (test-time augmentation; twice the cost)."""
    from tqdm.auto import tqdm

    model.eval()
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    top5 = n = 0
    for batch in tqdm(loader, desc="evaluating", disable=not progress, leave=False):
        logits = model(batch["inputs"]).float()
        if flip_tta:  # log of the mean probability: ranks as the mean softmax does
            mirrored = model(batch["inputs"].flip(-1)).float()
            logits = torch.logsumexp(torch.stack([logits.log_softmax(-1), mirrored.log_softmax(-1)]), 0)
        if class_index is not None:
            logits = logits[:, class_index]
        if logits.shape[-1] != num_classes:
            raise ValueError(f"the model gives {logits.shape[-1]} scores but the data has {num_classes} classes")
        y = batch["labels"].cpu()
        k = min(5, num_classes)
        top = logits.topk(k, dim=-1).indices.cpu()
        top5 += int((top == y[:, None]).any(-1).sum())
        np.add.at(conf, (y.numpy(), top[:, 0].numpy()), 1)
        n += len(y)
    if n == 0:
        raise ValueError("no images to evaluate")
    return {"top1": float(np.trace(conf) / n), "top5": top5 / n, "n": n, "confusion": conf}


def confusion_figure(conf: np.ndarray, names: list[str], title: str = ""):
    """A matplotlib Figure of the row-normalised confusion matrix (no pyplot: no GUI backend needed)."""
    from matplotlib.figure import Figure

    k = len(names)
    fig = Figure(figsize=(1.2 + 0.45 * k, 1.0 + 0.45 * k) if k <= 30 else (14, 14))
    ax = fig.subplots()
    norm = conf / np.maximum(conf.sum(1, keepdims=True), 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        for i in range(k):
            for j in range(k):
                if conf[i, j]:
                    ax.text(j, i, str(conf[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


class HeldOutTop1(HeldOutEvaluation):
    """After training: top-1 / top-5 on the data module's test split (the validation split when the tree has no
    test/, and the result says so)."""

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        dm = trainer.datamodule
        dm.setup()
        r = evaluate(pl_module.model, _on_device(dm.test_dataloader(), pl_module.device), dm.num_classes,
                     progress=trainer.progress_bar_callback is not None)
        split = "val (no test/ split)" if dm.test_is_val else "test"
        return {"metric": "top-1", "value": r["top1"], "top5": r["top5"], "images": r["n"],
                "protocol": f"{r['n']:,} {split} images, centre crop, top-5 {r['top5']:.4f}"}


def _on_device(loader, device):
    for batch in loader:
        yield {k: v.to(device) if k == "inputs" else v for k, v in batch.items()}


def check_classes(ckpt: Path, model_classes: list[str] | None, num_outputs: int, data_classes: list[str], root):
    if model_classes is not None and list(model_classes) != list(data_classes):
        missing = sorted(set(data_classes) - set(model_classes))
        raise CheckpointError(
            f"checkpoint {ckpt} was trained on classes {model_classes[:10]}{' ...' if len(model_classes) > 10 else ''}"
            f" but {root} has {data_classes[:10]}{' ...' if len(data_classes) > 10 else ''}"
            + (f" (not in the checkpoint: {missing[:5]})" if missing else " (a different order)"))
    if model_classes is None and num_outputs != len(data_classes):
        raise CheckpointError(f"checkpoint {ckpt} has {num_outputs} classes but {root} has {len(data_classes)}; "
                              "fine-tune it on this data first (python -m apps.vision.finetune), or use "
                              "--class-map imagenet for an ImageNet model on a WNID-named subset")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint folder, hustvl .pth or Lightning .ckpt (default: runs/vision/pretrained,"
                                  " else the shipped model)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="image-folder root with train/ [val/ test/]")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--class-map", choices=["imagenet"], help="score a 1000-class ImageNet model on WNID folders")
    p.add_argument("--plot", help="write the confusion matrix to this image file")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--ema", action="store_true", help="hustvl .pth: use model_ema")
    p.add_argument("--flip-tta", action="store_true",
                   help="average the softmax of each image and of its mirror image (2x the cost)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    ckpt = resolve_checkpoint(a.ckpt)
    model, cfg = load_vision_model(ckpt, use_ema=a.ema)
    from timm.data import resolve_data_config

    dm = ImageFolderDataModule(str(repo_path(a.data)), batch_size=a.batch_size, auto_augment=None, mixup=0, cutmix=0)
    dm.model_data_config = resolve_data_config({}, model=model)
    dm.setup()
    class_index = None
    if a.class_map == "imagenet":
        wnids = imagenet_wnids()
        unknown = [c for c in dm.classes if c not in wnids]
        if unknown:
            raise CheckpointError(f"{a.data}: class folders {unknown[:5]} are not ImageNet WNIDs")
        class_index = [wnids.index(c) for c in dm.classes]
    else:
        check_classes(ckpt, cfg.get("class_names"), getattr(model, "num_classes", 0), dm.classes, a.data)
    split = {"train": dm.train_set, "val": dm.val_set, "test": dm.test_set}[a.split]
    loader = dm._loader(split, train=False)
    r = evaluate(model, loader, dm.num_classes, class_index, flip_tta=a.flip_tta)
    if a.split == "train":
        r["note"] = "train split with evaluation transforms"
    name = f"{ckpt.name} on {Path(a.data).name}/{a.split}"
    if a.split == "test" and dm.test_is_val:
        name += " (no test/: the validation split)"
    if a.plot:
        fig = confusion_figure(r["confusion"], dm.classes, f"{name}: top-1 {r['top1']:.4f}")
        fig.savefig(a.plot, dpi=120)
    out = {"checkpoint": str(ckpt), "data": str(a.data), "split": a.split, "images": r["n"], "top1": r["top1"],
           "top5": r["top5"], "flip_tta": a.flip_tta}
    if a.json:
        print(json.dumps(dict(out, confusion=r["confusion"].tolist(), classes=dm.classes), indent=2))
    else:
        name += " (flip TTA)" if a.flip_tta else ""
        print(f"{name}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  ({r['n']:,} images)"
              + (f"; confusion matrix -> {a.plot}" if a.plot else ""))
    return out


if __name__ == "__main__":
    run_cli(main)
