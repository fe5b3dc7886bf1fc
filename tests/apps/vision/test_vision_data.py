"""Image data: the robust ImageFolder (bad / odd images), the DataModule with timm transforms and Mixup, the
bundled Fashion-MNIST sample, and the recipes (Fashion-MNIST IDX converter, ImageNet subsets from a fake tree)."""

from __future__ import annotations

import gzip
import importlib.util
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apps.vision.data import (
    BadImageError,
    BadImageWarning,
    ImageFolderDataModule,
    RobustImageFolder,
    check_tree,
    load_image,
)

torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is fastest
ROOT = Path(__file__).resolve().parents[3]
SAMPLE = ROOT / "datasets" / "samples" / "fashion_mnist_small"


def recipe(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "datasets" / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rgb(size=(20, 16), seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def make_tree(root: Path, classes=("cat", "dog"), per_class=4, splits=("train",)):
    for s in splits:
        for k, c in enumerate(classes):
            (root / s / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                rgb(seed=100 * k + i).save(root / s / c / f"{i}.png")
    return root


def test_odd_modes_are_converted(tmp_path):
    a16 = (np.arange(20 * 20, dtype=np.uint16).reshape(20, 20) * 150)
    Image.fromarray(a16).save(tmp_path / "g16.png")  # 16-bit grey
    Image.new("RGBA", (20, 20), (255, 0, 0, 0)).save(tmp_path / "transparent.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    Image.new("P", (20, 20)).save(tmp_path / "palette.gif")
    for f in tmp_path.iterdir():
        assert load_image(f, channels=3).mode == "RGB"
        assert load_image(f, channels=1).mode == "L"
    g = np.asarray(load_image(tmp_path / "g16.png", 1))
    assert g.max() > 200 and g.min() == 0 and len(np.unique(g)) > 100  # scaled by 1/257, not clipped to white
    assert np.asarray(load_image(tmp_path / "transparent.png", 3)).min() == 255  # alpha on white
    r, gch, b = np.asarray(load_image(tmp_path / "cmyk.jpg", 3)).mean(axis=(0, 1))
    assert r > 200 and gch < 60 and b < 60


def test_bad_images_name_the_file(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    rgb((64, 64)).save(tmp_path / "full.jpg", quality=90)
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "full.jpg").read_bytes()[:400])
    (tmp_path / "text.png").write_text("not an image")
    rgb((4, 30)).save(tmp_path / "tiny.png")
    for name, why in (("zero.png", "empty"), ("trunc.jpg", "unreadable"), ("text.png", "unreadable"),
                      ("tiny.png", "smaller than")):
        with pytest.raises(BadImageError, match=f"{name}.*{why}"):
            load_image(tmp_path / name)


def test_bad_image_mid_epoch_is_skipped_with_a_warning(tmp_path):
    root = make_tree(tmp_path, per_class=3)
    (root / "train" / "dog" / "1.png").write_bytes(b"\x89PNG broken")
    ds = RobustImageFolder(root / "train")
    with pytest.warns(BadImageWarning, match="dog/1.png"):
        items = [ds[i] for i in range(len(ds))]
    assert len(items) == 6 and all(isinstance(x, Image.Image) for x, _ in items)
    assert list(ds.bad) == [str(root / "train" / "dog" / "1.png")]
    assert list(check_tree(root)) == [str(root / "train" / "dog" / "1.png")]


def test_class_folder_errors(tmp_path):
    root = make_tree(tmp_path / "a", per_class=2, splits=("train", "val"))
    (root / "train" / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"no images: \['empty_class'\]"):
        RobustImageFolder(root / "train")
    root = make_tree(tmp_path / "b", per_class=2, splits=("train", "val"))
    make_tree(root, classes=("bird",), per_class=1, splits=("val",))
    with pytest.raises(ValueError, match=r"\['bird'\] are not among the training classes"):
        RobustImageFolder(root / "val", classes=["cat", "dog"])
    # a class missing from val is fine: labels follow train's order
    (root / "val" / "bird").rename(tmp_path / "gone")
    import shutil
    shutil.rmtree(root / "val" / "cat")
    val = RobustImageFolder(root / "val", classes=["cat", "dog"])
    assert set(val.targets) == {1}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        RobustImageFolder(tmp_path / "nope")


def test_datamodule_split_verify_mixup(tmp_path):
    root = make_tree(tmp_path, classes=("a", "b", "c"), per_class=6)
    (root / "train" / "b" / "9.png").write_bytes(b"")  # dropped at setup, with a warning naming it
    dm = ImageFolderDataModule(str(root), batch_size=4, img_size=24, in_chans=3, val_frac=0.34,
                               auto_augment="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0)
    with pytest.warns(BadImageWarning, match="9.png"):
        dm.setup()
    assert dm.classes == ["a", "b", "c"] and dm.test_is_val
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6  # 2 of 6 per class held out, stratified
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    batch = next(iter(dm.train_dataloader()))
    assert batch["inputs"].shape == (4, 3, 24, 24) and batch["labels"].dtype == torch.int64
    x, y = dm.mixup_fn(batch["inputs"], batch["labels"])
    assert y.shape == (4, 3) and torch.allclose(y.sum(1), torch.ones(4))
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["inputs"].shape == (4, 3, 24, 24)


def test_train_on_val_adds_the_val_folder_with_training_transforms(tmp_path):
    root = make_tree(tmp_path, classes=("a", "b"), per_class=3, splits=("train", "val"))
    kw = dict(batch_size=2, img_size=24, in_chans=3, auto_augment=None, mixup=0, cutmix=0, verify=False)
    plain = ImageFolderDataModule(str(root), **kw)
    plain.setup()
    assert len(plain.train_set) == 6 and len(plain.val_set) == 6
    both = ImageFolderDataModule(str(root), train_on_val=True, **kw)
    both.setup()
    assert len(both.train_set) == 12 and len(both.val_set) == 6
    added = both.train_set.datasets[1]
    assert added.samples == both.val_set.samples and added.transform is not both.val_set.transform
    assert both.val_set.transform is not None and added.transform is both.train_set.datasets[0].dataset.transform
    with pytest.raises(ValueError, match="train_on_val.*val not found"):
        ImageFolderDataModule(str(make_tree(tmp_path / "no_val")), train_on_val=True, **kw).setup()


def test_bundled_fashion_mnist_sample():
    dm = ImageFolderDataModule(str(SAMPLE), batch_size=8, img_size=28, in_chans=1, mean=[0.286], std=[0.353],
                               auto_augment=None, mixup=0, cutmix=0, verify=False)
    dm.setup()
    assert dm.num_classes == 10 and dm.classes[0] == "0_tshirt_top" and dm.classes[9] == "9_ankle_boot"
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (500, 100, 300)
    b = next(iter(dm.test_dataloader()))
    assert b["inputs"].shape == (8, 1, 28, 28)


def test_fashion_mnist_recipe_on_idx_files(tmp_path):
    fm = recipe("fashion_mnist")
    rng = np.random.default_rng(0)

    def idx(path, arr):
        dims = arr.shape
        header = struct.pack(">HBB", 0, 8, len(dims)) + b"".join(struct.pack(">I", d) for d in dims)
        with gzip.open(path, "wb") as f:
            f.write(header + arr.astype(np.uint8).tobytes())

    src = tmp_path / "idx"
    src.mkdir()
    idx(src / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (60, 28, 28)))
    idx(src / "train-labels-idx1-ubyte.gz", np.arange(60) % 10)
    idx(src / "t10k-images-idx3-ubyte.gz", rng.integers(0, 255, (20, 28, 28)))
    idx(src / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    counts = fm.convert(src, tmp_path / "out", train_per_class=3, val_per_class=1, test_per_class=2)
    assert counts == {"train": 30, "val": 10, "test": 20}
    ds = RobustImageFolder(tmp_path / "out" / "train", channels=1)
    assert ds.classes[3] == "3_dress" and len(ds) == 30
    val = {p.name for p in (tmp_path / "out" / "val").rglob("*.png")}
    assert not val & {p.name for p in (tmp_path / "out" / "train").rglob("*.png")}  # val comes out of train
    with pytest.raises(FileExistsError):
        fm.convert(src, tmp_path / "out")


def fake_imagenet(root: Path, wnids, per_class=4, flat_val=True):
    for w in wnids:
        (root / "train" / w).mkdir(parents=True)
        for i in range(per_class):
            rgb(seed=i).save(root / "train" / w / f"{w}_{i}.JPEG", format="JPEG")
    (root / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for j, w in enumerate(wnids * 2):
        name = f"ILSVRC2012_val_{j + 1:08d}"
        if flat_val:
            rgb(seed=j).save(root / "val" / f"{name}.JPEG", format="JPEG")
        else:
            (root / "val" / w).mkdir(exist_ok=True)
            rgb(seed=j).save(root / "val" / w / f"{name}.JPEG", format="JPEG")
        lines.append(f"{name},{w} 1 2 3 4")
    return "\n".join(lines) + "\n"


def test_imagenet_subset_recipe_flat_val_with_labels(tmp_path):
    ims = recipe("imagenet_subset")
    nette = [w for w, _ in ims.read_wnid_list("imagenette")]
    assert len(nette) == 10 and nette[0] == "n01440764"
    assert len(ims.read_wnid_list("imagenet100")) == 100 and len(ims.read_wnid_list("imagewoof")) == 10
    src = tmp_path / "imagenet"
    csv_text = fake_imagenet(src, nette[:3] + ["n09999999"])  # one class outside the subset
    (tmp_path / "wnids.txt").write_text("\n".join(nette[:3]) + "\n")
    with pytest.raises(FileNotFoundError, match="flat"):
        ims.build_subset(src, str(tmp_path / "wnids.txt"), tmp_path / "x")
    (src / "LOC_val_solution.csv").write_text(csv_text)
    counts = ims.build_subset(src, str(tmp_path / "wnids.txt"), tmp_path / "sub", train_per_class=3)
    assert counts == {"train": 9, "val": 6, "test": 0}
    link = next((tmp_path / "sub" / "train" / nette[0]).iterdir())
    assert link.is_symlink() and link.resolve().parent == (src / "train" / nette[0]).resolve()
    val = RobustImageFolder(tmp_path / "sub" / "val", classes=sorted(nette[:3]))
    assert len(val) == 6
    with pytest.raises(FileNotFoundError, match="no folder for 7"):
        ims.build_subset(src, "imagenette", tmp_path / "y")
    # foldered val, test split from val, plain text labels path also accepted
    src2 = tmp_path / "imagenet2"
    fake_imagenet(src2, nette[:2], flat_val=False)
    (tmp_path / "two.txt").write_text("\n".join(nette[:2]))
    counts = ims.build_subset(src2, str(tmp_path / "two.txt"), tmp_path / "sub2", val_per_class=1,
                              test_from_val=True)
    assert counts == {"train": 6, "val": 2, "test": 4}


def test_imagenet_subset_whitespace_labels_file(tmp_path):
    ims = recipe("imagenet_subset")
    src = tmp_path / "imagenet"
    fake_imagenet(src, ["n01440764"])
    (tmp_path / "labels.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002 n01440764\n")
    (tmp_path / "one.txt").write_text("n01440764 tench\n")
    counts = ims.build_subset(src, str(tmp_path / "one.txt"), tmp_path / "o", val_labels=tmp_path / "labels.txt",
                              copy=True)
    assert counts["val"] == 2 and not next((tmp_path / "o" / "val" / "n01440764").iterdir()).is_symlink()
    assert (tmp_path / "o" / "classes.tsv").read_text() == "n01440764\ttench\n"
    warnings.simplefilter("ignore")
