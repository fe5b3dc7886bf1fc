"""Fashion-MNIST (Zalando, 70,000 28x28 grey images, 10 classes, MIT) -> an image folder any ImageFolder reads.

    python datasets/recipes/fashion_mnist.py                        # apt-get download dataset-fashion-mnist, all
    python datasets/recipes/fashion_mnist.py --idx DIR              # DIR holds the four *-ubyte(.gz) IDX files
    python datasets/recipes/fashion_mnist.py --out datasets/samples/fashion_mnist_small \\
        --train-per-class 100 --val-per-class 20 --test-per-class 50  # the bundled sample (this exact command)

Writes ``OUT/{train,val,test}/<k>_<name>/<split>_<index>.png`` (PNG, mode L). Class folders are prefixed with
the Fashion-MNIST label so that ImageFolder's sorted order is the official label order. ``val`` is taken out of
the official 60,000 training images (5,000 = 500 per class by default, seeded); ``test`` is the official
10,000-image test set, never used for model selection. Subsets (``--*-per-class N``) take the first N images
of each class after a seeded shuffle, so the small sample is a subset of any larger one. The IDX files are
read with torchvision's reader. Debian's ``dataset-fashion-mnist`` ships them as
``usr/share/datasets/fashion-mnist/*-ubyte.gz``; elsewhere, download them from
https://github.com/zalandoresearch/fashion-mnist.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "datasets" / "fashion_mnist"
IDX_IN_DEB = "usr/share/datasets/fashion-mnist"
CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def class_folder(k: int) -> str:
    return f"{k}_{CLASSES[k]}"


def fetch_idx(workdir: Path) -> Path:
    """apt-get download the Debian package (no install), unpack it; returns the folder with the IDX files."""
    subprocess.run(["apt-get", "download", "dataset-fashion-mnist"], cwd=workdir, check=True)
    deb = next(workdir.glob("dataset-fashion-mnist_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True)
    return workdir / "root" / IDX_IN_DEB


def read_idx_pair(folder: Path, split: str, workdir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 28, 28), labels int64 (n,)) of the official split, via torchvision's IDX reader."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    out = []
    for name in FILES[split]:
        plain, packed = folder / name, folder / f"{name}.gz"
        if not plain.is_file():
            if not packed.is_file():
                raise FileNotFoundError(f"{folder}: neither {name} nor {name}.gz found")
            plain = workdir / name
            with gzip.open(packed, "rb") as src, open(plain, "wb") as dst:
                shutil.copyfileobj(src, dst)
        out.append(plain)
    images, labels = read_image_file(str(out[0])).numpy(), read_label_file(str(out[1])).numpy()
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels in the {split} split")
    return images, labels.astype(np.int64)


def per_class(labels: np.ndarray, n: int | None, rng: np.random.Generator, exclude: set[int] = frozenset()):
    """Indices: up to n per class (all if None), in a seeded random order, skipping ``exclude``."""
    order = rng.permutation(len(labels))
    picked, count = [], np.zeros(len(CLASSES), dtype=int)
    for i in order:
        k = int(labels[i])
        if i in exclude or (n is not None and count[k] >= n):
            continue
        picked.append(int(i))
        count[k] += 1
    return sorted(picked)


def write_split(out: Path, split: str, images: np.ndarray, labels: np.ndarray, indices: list[int],
                source: str) -> int:
    from PIL import Image

    for k in range(len(CLASSES)):
        (out / split / class_folder(k)).mkdir(parents=True, exist_ok=True)
    for i in indices:
        Image.fromarray(images[i], mode="L").save(
            out / split / class_folder(int(labels[i])) / f"{source}_{i:05d}.png", optimize=True)
    return len(indices)


def convert(idx_dir: Path, out: Path, train_per_class: int | None = None, val_per_class: int = 500,
            test_per_class: int | None = None, seed: int = 0) -> dict[str, int]:
    """IDX files -> OUT/{train,val,test}/<class>/*.png; returns image counts per split."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or pick another --out")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tr_x, tr_y = read_idx_pair(Path(idx_dir), "train", Path(tmp))
        te_x, te_y = read_idx_pair(Path(idx_dir), "test", Path(tmp))
    val = per_class(tr_y, val_per_class, rng)
    train = per_class(tr_y, train_per_class, rng, exclude=set(val))
    test = per_class(te_y, test_per_class, np.random.default_rng(seed + 1))
    return {"train": write_split(out, "train", tr_x, tr_y, train, "train"),
            "val": write_split(out, "val", tr_x, tr_y, val, "train"),
            "test": write_split(out, "test", te_x, te_y, test, "test")}


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--idx", type=Path, help="folder with the IDX files (default: apt-get download the Debian package)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--train-per-class", type=int, default=None, help="default: all (5,500 per class)")
    p.add_argument("--val-per-class", type=int, default=500)
    p.add_argument("--test-per-class", type=int, default=None, help="default: all (1,000 per class)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        idx = a.idx or fetch_idx(Path(tmp))
        counts = convert(idx, a.out, a.train_per_class, a.val_per_class, a.test_per_class, a.seed)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
