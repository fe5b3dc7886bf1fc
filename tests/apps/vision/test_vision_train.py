"""End to end on tiny trees: train (LightningCLI, Mixup on) -> export -> evaluate (plot, class checks) -> predict
-> fine-tune from our checkpoint and from a hustvl .pth -> demo. A 1-layer width-16 Vim, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from apps.vision import demo, evaluate, finetune, predict, train
from apps.vision.model import CheckpointError, load_vision_model

torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is fastest
ROOT = Path(__file__).resolve().parents[3]
TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 1}


def make_tree(root: Path, classes=("ant", "bee", "cow"), n=(6, 2, 2)):
    for split, k in zip(("train", "val", "test"), n):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(k):
                a = np.full((20, 20, 3), 40 + 80 * c, np.uint8) + np.random.default_rng(i).integers(0, 30, (20, 20, 3),
                                                                                                  dtype=np.uint8)
                Image.fromarray(a).save(root / split / name / f"{i}.png")
    return root


def config(tmp: Path, root: Path, extra_model=None, **data) -> Path:
    cfg = {
        "model": {"model_name": "vim_tiny_patch16_224", "model_kwargs": dict(TINY, **(extra_model or {})),
                  "num_classes": 3, "lr": 1e-3, "warmup_steps": 1},
        "data": {"root": str(root), "batch_size": 4, "auto_augment": "rand-m5-mstd0.5", "mixup": 0.8, "cutmix": 1.0,
                 **data},
        "trainer": {"accelerator": "cpu", "max_steps": 3, "max_epochs": 1, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp),
                    "logger": [{"class_path": "pytorch_lightning.loggers.CSVLogger",
                                "init_args": {"save_dir": str(tmp), "name": "logs"}}],
                    "callbacks": [{"class_path": "apps.vision.classifier.ExportVisionModel",
                                   "init_args": {"dirpath": str(tmp / "pretrained")}},
                                  {"class_path": "apps.vision.evaluate.HeldOutTop1"}]},
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    root = make_tree(tmp / "data")
    cli = train.main(["--config", str(config(tmp, root))])
    return tmp, root, cli


def test_train_exports_and_reports_held_out_top1(trained):
    tmp, root, cli = trained
    held = next(tmp.rglob("heldout.json"))
    result = json.loads(held.read_text())
    assert result["metric"] == "top-1" and result["images"] == 6 and 0 <= result["value"] <= 1
    cfg = json.loads((tmp / "pretrained" / "config.json").read_text())
    assert cfg["class_names"] == ["ant", "bee", "cow"] and cfg["model_kwargs"]["num_classes"] == 3
    assert cfg["data_config"]["input_size"] == [3, 16, 16]
    model, _ = load_vision_model(tmp / "pretrained")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    ckpt = next(tmp.rglob("*.ckpt"))
    m2, cfg2 = load_vision_model(ckpt)
    assert cfg2["class_names"] == ["ant", "bee", "cow"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), m2(x))


def test_evaluate_cli_plot_and_class_checks(trained, tmp_path, capsys):
    tmp, root, _ = trained
    out = evaluate.main(["--ckpt", str(tmp / "pretrained"), "--data", str(root), "--plot", str(tmp_path / "c.png")])
    assert out["images"] == 6 and (tmp_path / "c.png").stat().st_size > 1000
    assert out["top5"] == 1.0  # 3 classes: top-5 holds every class
    other = make_tree(tmp_path / "other", classes=("ant", "bee", "dog"), n=(1, 0, 1))
    with pytest.raises(CheckpointError, match=r"trained on classes.*not in the checkpoint: \['dog'\]"):
        evaluate.main(["--ckpt", str(tmp / "pretrained"), "--data", str(other)])


def test_flip_tta_ranks_by_the_mean_softmax_of_an_image_and_its_mirror():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2 * 3, 4))  # orientation-sensitive scores
    x = torch.randn(64, 1, 2, 3)
    y = torch.randint(0, 4, (64,))
    with torch.no_grad():
        mean_p = (net(x).softmax(-1) + net(x.flip(-1)).softmax(-1)) / 2
        plain, tta = (evaluate.evaluate(net, [{"inputs": x, "labels": y}], 4, progress=False, flip_tta=f)
                      for f in (False, True))
    want = np.zeros((4, 4), np.int64)
    np.add.at(want, (y.numpy(), mean_p.argmax(-1).numpy()), 1)
    assert (tta["confusion"] == want).all()
    assert (plain["confusion"] != tta["confusion"]).any()  # the mirror changes some decisions of this net


def test_predict_cli_json_and_bad_image(trained, tmp_path, capsys):
    tmp, root, _ = trained
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    good = root / "test" / "cow" / "0.png"
    code = predict.main(["--ckpt", str(tmp / "pretrained"), "--json", "--top-k", "2", str(good), str(bad)])
    out, err = capsys.readouterr()
    assert code == 1 and "bad.jpg" in err
    rows = json.loads(out)[str(good)]
    assert len(rows) == 2 and {r["class"] for r in rows} <= {"ant", "bee", "cow"}


def test_finetune_from_our_checkpoint_and_a_hustvl_file(trained, tmp_path):
    tmp, _, _ = trained
    two = make_tree(tmp_path / "two", classes=("x", "y"), n=(4, 2, 2))
    over = tmp_path / "over.yaml"
    over.write_text(yaml.safe_dump({"trainer": {
        "max_steps": 2, "max_epochs": 1, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
        "logger": False, "callbacks": [{"class_path": "apps.vision.classifier.ExportVisionModel",
                                        "init_args": {"dirpath": str(tmp_path / "ft")}}]}}))
    common = ["--config", str(over), "--data.batch_size=4", "--data.auto_augment=null"]
    cli = finetune.main(["--ckpt", str(tmp / "pretrained"), "--data", str(two), "--layer-decay", "0.75",
                         "--img-size", "20", *common])
    assert cli.model.model.num_classes == 2 and cli.model.head_replaced
    assert cli.model.model.patch_embed.img_size == (20, 20)
    groups = cli.trainer.optimizers[0].param_groups
    assert len({round(g["lr"], 12) for g in groups}) == 3  # stem+layer 0, norm_f, head: layer-wise decay
    ft = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert ft["class_names"] == ["x", "y"] and ft["model_kwargs"]["img_size"] == 20
    # hustvl layout: the variant is read from the weights
    from test_vision_model import hustvl_state_dict, write_hustvl_pth

    pth = write_hustvl_pth(tmp_path / "vim_t.pth", hustvl_state_dict())
    cli = finetune.main(["--ckpt", str(pth), "--data", str(two), "--img-size", "32", *common])
    assert cli.model.model.num_classes == 2 and cli.model.model.embed_dim == 32


def test_demo_classifies_and_explains(trained, tmp_path):
    tmp, root, _ = trained
    ui = demo.build_demo(str(tmp / "pretrained"))
    assert ui is not None
    pred = predict.Predictor(tmp / "pretrained")
    labels, overlay_img, note = demo.classify(pred, str(root / "test" / "bee" / "1.png"))
    assert set(labels) == {"ant", "bee", "cow"} and abs(sum(labels.values()) - 1) < 1e-5
    assert overlay_img.dtype == np.uint8 and overlay_img.shape[-1] == 3 and "gradient" in note
    bad = tmp_path / "x.png"
    bad.write_bytes(b"")
    with pytest.raises(demo.gr.Error, match="x.png"):
        demo.classify(pred, str(bad))
    missing = demo.build_demo(str(tmp_path / "nowhere"))
    assert missing is not None  # a page that explains, not a crash


def test_shipped_checkpoint_and_examples():
    """The model in the repository answers on the shipped examples (a fresh clone's demo)."""
    pred = predict.Predictor(evaluate.SHIPPED)
    assert len(pred.classes) == 10 and pred.classes[9] == "ankle boot"
    examples = [p for p in demo.EXAMPLES if p.name.startswith("fashion_")]
    tops = [row[0][0] for row in pred.topk(examples, k=1)]
    truth = [p.stem.removeprefix("fashion_").replace("_", " ") for p in examples]
    assert sum(t == g for t, g in zip(tops, truth)) >= len(examples) - 1


def test_timm_deit_baseline_through_the_same_module(tmp_path):
    """timm's own DeiT builds, reports its real input size to the data module, saves and reloads."""
    from apps.vision.classifier import VisionClassifier
    from apps.vision.model import save_vision_model

    kw = {"img_size": 16, "patch_size": 4, "in_chans": 1, "embed_dim": 16, "depth": 1, "num_heads": 2}
    module = VisionClassifier("deit_tiny_patch16_224", kw, num_classes=3)
    assert module.data_config["input_size"] == (1, 16, 16) and len(module.data_config["mean"]) == 1
    save_vision_model(module.model, tmp_path / "deit", "deit_tiny_patch16_224", kw, ["a", "b", "c"],
                      data_config={"mean": (0.3,), "std": (0.4,)})
    model, cfg = load_vision_model(tmp_path / "deit")
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), module.model.eval()(x))
    from timm.data import resolve_data_config
    assert resolve_data_config({}, model=model)["mean"] == (0.3,)


@pytest.mark.parametrize("name", ["default", "deit_baseline", "fashion_mnist", "imagenet_vim_tiny"])
def test_shipped_configs_parse(name, capsys):
    """Every config names importable classes with valid arguments (printed, not run: some need a GPU)."""
    path = ROOT / "apps" / "vision" / "configs" / f"{name}.yaml"
    with pytest.raises(SystemExit) as e:
        train.main(["fit", "--config", str(path), "--print_config"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert "model_name:" in out
    if name == "imagenet_vim_tiny":  # read over default.yaml: none of Fashion-MNIST's grey normalisation or crops
        data = yaml.safe_load(out)["data"]
        assert data["mean"] is None and data["std"] is None and data["crop_pct"] is None
        assert data["scale"] == [0.08, 1.0]


def test_ema_callback_with_the_module(trained, tmp_path):
    """The ImageNet recipe's EMA (Lightning's EMAWeightAveraging) runs with VisionClassifier and the export."""
    tmp, root, _ = trained
    over = tmp_path / "ema.yaml"
    over.write_text(yaml.safe_dump({"trainer": {
        "max_steps": 3, "max_epochs": 1, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
        "logger": False, "enable_checkpointing": False,
        "callbacks": [{"class_path": "pytorch_lightning.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                      {"class_path": "apps.vision.classifier.ExportVisionModel",
                       "init_args": {"dirpath": str(tmp_path / "ema_out")}}]}}))
    train.main(["--config", str(config(tmp_path, root)), "--config", str(over)])
    model, _ = load_vision_model(tmp_path / "ema_out")
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
