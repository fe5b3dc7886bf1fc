"""The image classifier LightningModule: any timm model (Vim from apps.vision.model, or timm's own DeiT / ViT /
ResNet for baselines) built by name, trained by apps.common.ClassifierModule (loss with soft targets for
Mixup / CutMix, accuracy, AdamW + warm-up + cosine), plus what vision training adds on top of the kit:

  * ``init_from``: start from a checkpoint (ours, hustvl's .pth, a Lightning .ckpt), position embeddings
    resampled to the new image size, a fresh head when the class count differs (fine-tuning);
  * ``layer_decay``: layer-wise lr decay through timm's ``param_groups_layer_decay`` (the model's group_matcher);
  * ``lr_batch`` / ``warmup_epochs``: DeiT's rule lr = lr x global batch / lr_batch, warm-up in epochs;
  * ``ExportVisionModel``: config.json (timm name + kwargs + class names + data config) + model.safetensors.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch
from timm.data import resolve_data_config

from apps.common.callbacks import ExportPretrained
from apps.common.classify import ClassifierModule
from apps.common.optim import adamw_warmup_cosine, attached_trainer, warmup_cosine
from apps.vision.model import apply_data_config, create_vision_model, load_weights_into, read_any, save_vision_model

__all__ = ["VisionClassifier", "ExportVisionModel", "CPUSettings"]


class VisionClassifier(ClassifierModule):
    """model_name: a timm name (``vim_tiny_patch16_224``, ``deit_tiny_patch16_224``, ...); model_kwargs: its
    keyword arguments (img_size, patch_size, in_chans, embed_dim, depth, drop_path_rate, ...). init_from: a
    checkpoint to start from; new_head: a fresh classifier even when the class count matches (fine-tuning)."""

    def __init__(self, model_name: str = "vim_tiny_patch16_224", model_kwargs: dict | None = None,
                 num_classes: int = 10, init_from: str | None = None, init_use_ema: bool = False,
                 new_head: bool = False,
                 lr: float = 1e-3, weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 50, warmup_epochs: float | None = None, min_lr_ratio: float = 0.01,
                 label_smoothing: float = 0.1, layer_decay: float | None = None, lr_batch: int | None = None,
                 class_names: list[str] | None = None):
        net = create_vision_model(model_name, num_classes=num_classes, **(model_kwargs or {}))
        super().__init__(net, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing, pass_lengths=False)
        self.save_hyperparameters()
        self.class_names = list(class_names) if class_names else None
        self.head_replaced = None
        if init_from:
            sd, cfg = read_any(init_from, use_ema=init_use_ema)
            apply_data_config(net, cfg.get("data_config"))  # keep the checkpoint's normalisation
            self.head_replaced = load_weights_into(net, sd, cfg["model_kwargs"], init_from, cfg["model"])
            if new_head and not self.head_replaced:  # same class count, other classes: a fresh head all the same
                net.reset_classifier(num_classes)
                self.head_replaced = True
            if not self.head_replaced and cfg.get("class_names") and not self.class_names:
                self.class_names = cfg["class_names"]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        names = getattr(getattr(attached_trainer(self), "datamodule", None), "labels", None)
        if names is not None:
            if self.class_names and self.head_replaced is False and list(names) != list(self.class_names):
                raise ValueError(f"the checkpoint's classes {self.class_names[:10]} differ from the data's "
                                 f"{list(names)[:10]}: train a new head (--model.new_head=true; apps.vision.finetune "
                                 "does)")
            self.class_names = list(names)

    @property
    def data_config(self) -> dict:
        """The network's timm data config (the data module reads its defaults from here)."""
        return resolve_data_config({}, model=self.model)

    def trained_data_config(self) -> dict:
        """What the data module actually fed the network (explicit data.* options included)."""
        dm = getattr(attached_trainer(self), "datamodule", None)
        return dict(getattr(dm, "cfg", None) or self.data_config)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hyper_parameters"]["class_names"] = self.class_names
        checkpoint["hyper_parameters"]["data_config"] = self.trained_data_config()

    def configure_optimizers(self):
        o = dict(self.optim)
        trainer = attached_trainer(self)
        if self.hparams.lr_batch and trainer is not None:
            dm = getattr(trainer, "datamodule", None)
            batch = getattr(getattr(dm, "hparams", {}), "get", lambda *_: None)("batch_size") or 1
            o["lr"] = o["lr"] * batch * trainer.accumulate_grad_batches * trainer.world_size / self.hparams.lr_batch
        total = None
        if trainer is not None:
            est = trainer.estimated_stepping_batches
            total = int(est) if est is not None and math.isfinite(est) else None
            if self.hparams.warmup_epochs is not None and total and trainer.max_epochs and trainer.max_epochs > 0:
                o["warmup_steps"] = int(self.hparams.warmup_epochs * total / trainer.max_epochs)
        if not self.hparams.layer_decay:
            return adamw_warmup_cosine(self, self.model, total_steps=total, **o)
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(self.model, o["weight_decay"], layer_decay=self.hparams.layer_decay,
                                          no_weight_decay_list=list(self.model.no_weight_decay())
                                          if hasattr(self.model, "no_weight_decay") else ())
        for g in groups:
            g["lr"] = o["lr"] * g.pop("lr_scale", 1.0)
        opt = torch.optim.AdamW(groups, lr=o["lr"], betas=tuple(o["betas"]))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: warmup_cosine(s, o["warmup_steps"], total, o["min_lr_ratio"]))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ExportVisionModel(ExportPretrained):
    """When fitting ends, write ``dirpath`` (default ``<default_root_dir>/pretrained``) with save_vision_model:
    what evaluate, predict, finetune and the demo read."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: VisionClassifier) -> None:
        out = self.target(trainer)
        if trainer.is_global_zero and not trainer.sanity_checking:
            hp = pl_module.hparams
            save_vision_model(pl_module.model, out, hp.model_name, dict(hp.model_kwargs or {}),
                              pl_module.class_names, extra={"trained_steps": trainer.global_step},
                              data_config=pl_module.trained_data_config())
            print(f"model written to {Path(out)}")


class CPUSettings(pl.Callback):
    """Process-wide CPU settings for small models, applied when fitting starts: ``threads`` intra-op threads
    (measured on the 2-core box, Vim of width 64 on 28x28 images: 1 thread 0.38 s/step, 2 threads 5 s/step on a
    loaded machine: OpenMP barriers spin when a core is taken) and flush-denormal (the scan's exp(dt*A) decays
    reach subnormal floats on real images; flushing them to zero cut CPU time per epoch by ~40%)."""

    def __init__(self, threads: int | None = 1, flush_denormal: bool = True):
        self.threads, self.flush_denormal = threads, flush_denormal

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._threads_before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.flush_denormal:
            torch.set_flush_denormal(True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # both settings are process-wide: give the process back as it was (IEEE subnormals, its thread count)
        if self.flush_denormal:
            torch.set_flush_denormal(False)
        torch.set_num_threads(self._threads_before)
