"""ImageNet subsets (Imagenette, Imagewoof, ImageNet-100, or any WNID list) from a local ImageNet-1k copy, as
symlinks (no copies) in an image-folder tree that apps.vision reads.

    python datasets/recipes/imagenet_subset.py --imagenet /data/imagenet --subset imagenette --out datasets/imagenette
    python datasets/recipes/imagenet_subset.py --imagenet /data/imagenet --subset imagenet100 \\
        --train-per-class 260 --out datasets/imagenet100_260          # N training images per class
    python datasets/recipes/imagenet_subset.py --imagenet /data/imagenet --subset my_wnids.txt --copy ...

Input layouts (``--imagenet DIR``):
  * ``DIR/train/<wnid>/*.JPEG`` (always), and ``DIR/val/<wnid>/*.JPEG`` (already sorted into folders), or
  * a flat ``DIR/val/*.JPEG`` (as the ILSVRC2012 tarball unpacks) plus its labels from one of: ``--val-labels FILE``
    with ``<file name> <wnid>`` lines (CSV or whitespace), Kaggle's ``LOC_val_solution.csv`` (found in DIR or its
    parent, or given as --val-labels), or the official devkit (``--devkit DIR``: ``data/meta.mat`` and
    ``data/ILSVRC2012_validation_ground_truth.txt``, read by torchvision's ImageNet helpers).

Output: ``OUT/train/<wnid>/`` and ``OUT/val/<wnid>/`` of links to the original files, and ``OUT/classes.tsv``
(wnid, name where known). The ImageNet val images are the held-out split: pass ``--test-from-val`` to write them
as ``OUT/test/`` instead and hold out ``--val-per-class`` training images as ``OUT/val/`` for model selection.
Subsets of N per class take the first N files after a seeded shuffle of the sorted file names.
Shipped lists (``datasets/recipes/imagenet_lists/``): imagenette.txt, imagewoof.txt (WNID + name),
imagenet100.txt (the CMC ImageNet-100 WNIDs).
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
LISTS = HERE / "imagenet_lists"
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def read_wnid_list(subset: str) -> list[tuple[str, str]]:
    """(wnid, name or "") from a shipped list name (imagenette, imagewoof, imagenet100) or a text file."""
    path = LISTS / f"{subset}.txt" if (LISTS / f"{subset}.txt").is_file() else Path(subset)
    if not path.is_file():
        shipped = sorted(p.stem for p in LISTS.glob("*.txt"))
        raise FileNotFoundError(f"--subset {subset!r}: neither a shipped list {shipped} nor a file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        wnid, _, name = line.partition(" ")
        if not (wnid.startswith("n") and len(wnid) == 9 and wnid[1:].isdigit()):
            raise ValueError(f"{path}:{n}: {wnid!r} is not a WNID (n + 8 digits)")
        out.append((wnid, name.strip()))
    if len({w for w, _ in out}) != len(out):
        raise ValueError(f"{path}: duplicate WNIDs")
    return out


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def read_val_labels(imagenet: Path, val_labels: Path | None, devkit: Path | None) -> dict[str, str]:
    """{val file name: wnid} for a flat val/ folder."""
    if devkit is not None:
        from torchvision.datasets.imagenet import parse_meta_mat, parse_val_groundtruth_txt

        idx_to_wnid, _ = parse_meta_mat(str(devkit))
        labels = parse_val_groundtruth_txt(str(devkit))
        files = _images(imagenet / "val")
        if len(files) != len(labels):
            raise ValueError(f"{imagenet}/val has {len(files)} images, the devkit ground truth {len(labels)} labels")
        return {f.name: idx_to_wnid[i] for f, i in zip(files, labels)}
    candidates = [val_labels] if val_labels else [imagenet / "LOC_val_solution.csv",
                                                  imagenet.parent / "LOC_val_solution.csv"]
    path = next((p for p in candidates if p and p.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"{imagenet}/val is flat (no class folders) and no labels were found: pass "
                                "--val-labels FILE (lines '<file> <wnid>', or Kaggle's LOC_val_solution.csv) or "
                                "--devkit DIR")
    out = {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f) if path.suffix == ".csv" else (r.split() for r in f), 1):
            if not row or row[0].startswith("#") or row[0] == "ImageId":
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{n}: expected '<file> <wnid>', got {row}")
            name, wnid = row[0], row[1].split()[0]  # LOC_val_solution: "n01751748 x y x y ..." -> the WNID
            if not Path(name).suffix:
                name += ".JPEG"
            out[name] = wnid
    return out


def _pick(files: list[Path], n: int | None, rng: random.Random) -> list[Path]:
    files = list(files)
    rng.shuffle(files)
    return sorted(files[:n] if n is not None else files)


def _link(src: Path, dst: Path, copy: bool):
    dst.parent.mkdir(parents=True, exist_ok=True)
    if copy:
        shutil.copy2(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def build_subset(imagenet: Path, subset: str, out: Path, train_per_class: int | None = None,
                 val_per_class: int | None = None, val_labels: Path | None = None, devkit: Path | None = None,
                 test_from_val: bool = False, copy: bool = False, seed: int = 0) -> dict[str, int]:
    """Build the tree; returns image counts per split. Missing WNIDs in the source are an error naming them."""
    imagenet, out = Path(imagenet), Path(out)
    wnids = read_wnid_list(subset)
    train_root, val_root = imagenet / "train", imagenet / "val"
    if not train_root.is_dir():
        raise FileNotFoundError(f"{train_root} not found: --imagenet should hold train/<wnid>/ folders")
    missing = [w for w, _ in wnids if not (train_root / w).is_dir()]
    if missing:
        raise FileNotFoundError(f"{train_root}: no folder for {len(missing)} WNID(s) of {subset}: {missing[:5]}")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; remove it or pick another --out")
    val_files: dict[str, list[Path]] = {w: [] for w, _ in wnids}
    if val_root.is_dir():
        if any((val_root / w).is_dir() for w, _ in wnids):
            for w in val_files:
                val_files[w] = _images(val_root / w) if (val_root / w).is_dir() else []
        else:
            labels = read_val_labels(imagenet, val_labels, devkit)
            for f in _images(val_root):
                w = labels.get(f.name)
                if w in val_files:
                    val_files[w].append(f)
    rng = random.Random(seed)
    counts = {"train": 0, "val": 0, "test": 0}
    held_split = "test" if test_from_val else "val"
    for w, _ in wnids:
        train = _images(train_root / w)
        if not train:
            raise FileNotFoundError(f"{train_root / w} holds no images")
        order = list(train)
        rng.shuffle(order)
        if test_from_val:  # model selection on a slice of train; ImageNet val becomes the untouched test split
            n_val = val_per_class if val_per_class is not None else max(1, len(order) // 20)
            sel_val, order = sorted(order[:n_val]), order[n_val:]
            for f in sel_val:
                _link(f, out / "val" / w / f.name, copy)
            counts["val"] += len(sel_val)
        picked = sorted(order[:train_per_class] if train_per_class is not None else order)
        for f in picked:
            _link(f, out / "train" / w / f.name, copy)
        counts["train"] += len(picked)
        held = _pick(val_files[w], None if test_from_val else val_per_class, rng)
        for f in held:
            _link(f, out / held_split / w / f.name, copy)
        counts[held_split] += len(held)
    (out / "classes.tsv").write_text("".join(f"{w}\t{n}\n" for w, n in wnids))
    return counts


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--imagenet", type=Path, required=True, help="ImageNet-1k root with train/ and val/")
    p.add_argument("--subset", required=True, help="imagenette | imagewoof | imagenet100 | a WNID list file")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-per-class", type=int, default=None)
    p.add_argument("--val-per-class", type=int, default=None)
    p.add_argument("--val-labels", type=Path, default=None)
    p.add_argument("--devkit", type=Path, default=None)
    p.add_argument("--test-from-val", action="store_true")
    p.add_argument("--copy", action="store_true", help="copy files instead of linking them")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    counts = build_subset(a.imagenet, a.subset, a.out, a.train_per_class, a.val_per_class, a.val_labels, a.devkit,
                          a.test_from_val, a.copy, a.seed)
    print(f"wrote {a.out}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v))


if __name__ == "__main__":
    main()
