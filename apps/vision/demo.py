"""Gradio demo for the image classifiers: ``python -m apps.vision.demo [--ckpt DIR_OR_FILE] [--port 7860]``.

Upload or pick an example image -> the top-5 classes and a saliency map over the image. The saliency map is a
*gradient map* (|d logit / d pixel| of the top class, max over colour channels, lightly smoothed), not Mamba's
"hidden attention": it is model-agnostic, so a Vim and timm's DeiT are shown the same way. Model: ``--ckpt``,
else ``runs/vision/pretrained`` (``python -m apps.vision.train``), else the small Vim shipped in
``apps/vision/assets/vim_fashion_mnist`` (Fashion-MNIST: clothing on a black background; a colour photo is
out of its domain and it says so by guessing). A hustvl ``.pth`` works too (1000 ImageNet classes). Served on
127.0.0.1 only; uploads are capped (10 MB, 40 megapixels).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from apps.common.demo import demo_main, gr, message_demo
from apps.common.errors import run_cli
from apps.vision.data import BadImageError, load_image
from apps.vision.evaluate import HOW_TO_TRAIN
from apps.vision.predict import Predictor

__all__ = ["build_demo", "classify", "overlay", "EXAMPLES", "main"]

EXAMPLES = sorted((Path(__file__).resolve().parent / "assets" / "examples").glob("*.*"))
MAX_PIXELS = 40_000_000
SHOW = 280  # px: the saliency overlay's display size for small inputs


def overlay(image: np.ndarray, sal: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The model's input image (H, W[, 3] in 0..1) under a colour-mapped saliency map, uint8 (S, S, 3)."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image
    heat = colormaps["inferno"](sal)[..., :3]
    mixed = np.clip((1 - alpha) * rgb + alpha * heat, 0, 1)
    out = Image.fromarray((mixed * 255).astype(np.uint8))
    if max(out.size) < SHOW:
        out = out.resize((SHOW, SHOW * out.size[1] // out.size[0]), Image.NEAREST)
    return np.asarray(out)


def _model_view(pred: Predictor, x: torch.Tensor) -> np.ndarray:
    """The normalised input tensor (1, C, H, W) back to 0..1 pixels, as the model sees them (after crop)."""
    mean = torch.tensor(pred.data_config["mean"]).view(-1, 1, 1)
    std = torch.tensor(pred.data_config["std"]).view(-1, 1, 1)
    img = (x[0] * std + mean).clamp(0, 1)
    return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


def classify(pred: Predictor | None, path: str | None):
    """-> ({class: probability} of the top 5, saliency overlay image, markdown note)."""
    if pred is None:
        raise gr.Error(f"no model loaded. {HOW_TO_TRAIN}")
    if not path:
        raise gr.Error("upload an image or pick an example")
    try:
        from PIL import Image

        with Image.open(path) as probe:
            w, h = probe.size
        if w * h > MAX_PIXELS:
            raise gr.Error(f"the image is {w}x{h} = {w * h / 1e6:.0f} megapixels; this demo takes at most "
                           f"{MAX_PIXELS / 1e6:.0f}")
        img = load_image(path, pred.channels)
    except gr.Error:
        raise
    except (BadImageError, OSError) as e:
        raise gr.Error(f"cannot read this image: {str(e).replace(str(path), Path(path).name)}") from None
    top = pred.topk([img], k=5)[0]
    sal, target = pred.saliency(img)
    view = _model_view(pred, pred.tensor(img))
    c, hh, ww = pred.data_config["input_size"]
    note = (f"Input as the model sees it: {ww}x{hh}, {'grey' if c == 1 else 'RGB'} (from {w}x{h}). Saliency: "
            f"gradient of the **{pred.classes[target]}** score with respect to each input pixel (absolute value, "
            "max over channels, smoothed) - bright pixels change that score most.")
    return {name: p for name, p in top}, overlay(view, sal), note


def build_demo(ckpt: str | None = None) -> gr.Blocks:
    """The UI; a missing or unreadable checkpoint gives a page that says so and how to make one."""
    try:
        pred = Predictor(ckpt)
    except (FileNotFoundError, ValueError) as e:
        return message_demo("hiss vision", f"**No model loaded.** {e}")
    n_params = sum(p.numel() for p in pred.model.parameters())
    c, h, w = pred.data_config["input_size"]
    classes = ", ".join(pred.classes[:12]) + (" ..." if len(pred.classes) > 12 else "")
    status = (f"Model: `{pred.ckpt}` ({pred.cfg['model']}, {n_params:,} parameters, {w}x{h} "
              f"{'grey' if c == 1 else 'RGB'} input). Classes: {classes}.")
    with gr.Blocks(title="hiss vision") as demo:
        gr.Markdown("## hiss vision: Vision Mamba image classification\n" + status)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image (PNG / JPEG / WebP ..., up to 10 MB)",
                                 sources=["upload", "clipboard"], height=300, elem_id="vision-image")
                go = gr.Button("Classify", variant="primary", elem_id="vision-classify")
                gr.Examples([[str(p)] for p in EXAMPLES], inputs=[image], label="examples (Fashion-MNIST test "
                            "images; two ImageNet validation photos, out of the shipped model's domain)")
            with gr.Column():
                label = gr.Label(num_top_classes=5, label="top-5", elem_id="vision-top5")
                sal = gr.Image(label="saliency (gradient map)", interactive=False, height=300,
                               elem_id="vision-saliency")
                note = gr.Markdown(elem_id="vision-note")
        go.click(lambda p: classify(pred, p), image, [label, sal, note])
        image.upload(lambda p: classify(pred, p), image, [label, sal, note])
    return demo


def main(argv: list[str] | None = None) -> None:
    demo_main(build_demo, argv, __doc__, ckpt_help="checkpoint folder, hustvl .pth or Lightning .ckpt")


if __name__ == "__main__":
    run_cli(main)
