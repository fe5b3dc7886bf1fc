"""Classification on any backbone: pooling, the head config saved beside a checkpoint, and the LightningModule
that is handed its network (lightning-hydra-template style), so every app classifies the same way.

    net = MyModel(...)                           # inputs (+ lengths) -> logits
    module = ClassifierModule(net, lr=1e-3)      # loss, accuracy, optimizer, logging

Batches are dicts: ``inputs`` (or ``input_ids``), ``labels`` and optional ``lengths`` (batch,) for right-padded
rows. ``labels`` is (batch,) for one label per sequence/image, (batch, L) with -100 ignored for one label per
position, or (batch, num_labels) float for soft targets (Mixup / CutMix).

Checkpoint folders of classifiers hold ``config.json`` (the backbone's own config), ``head.json`` (a HeadConfig)
and ``model.safetensors``: ``save_head_checkpoint`` / ``read_head_config`` write and read them, atomically.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssm_core import atomic_write

from .optim import adamw_warmup_cosine, attached_trainer

__all__ = ["POOLINGS", "TASKS", "HEAD_CONFIG", "WEIGHTS", "HeadConfig", "pool", "pooled_width",
           "save_head_checkpoint", "read_head_config", "ClassifierModule"]

POOLINGS = ("mean", "max", "first", "cls", "last", "center")
TASKS = ("mlm", "sequence", "token")
HEAD_CONFIG = "head.json"
WEIGHTS = "model.safetensors"


def pool(features: Tensor, lengths: Tensor | None, how: str, window: int = 0) -> Tensor:
    """features (batch, L, d) -> (batch, d), ignoring positions >= lengths[b]. "center": the position
    (lengths[b] - 1) // 2, for inputs whose signal sits at a fixed centre (a splice junction) read by a bidirectional
    backbone, whose centre position has seen both halves; with ``window`` w > 0 the features of the 2w + 1
    positions around it, concatenated in order -> (batch, (2w + 1) d): a head on them has weights per position."""
    B, L, _ = features.shape
    if lengths is None:
        lengths = torch.full((B,), L, device=features.device)
    if window and how != "center":
        raise ValueError(f"pool: a window is read around the centre only (pooling 'center'), got {how!r}")
    if how in ("first", "cls"):
        return features[:, 0]
    if how == "last":
        return features[torch.arange(B, device=features.device), lengths - 1]
    if how == "center":
        centre = (lengths - 1) // 2
        if not window:
            return features[torch.arange(B, device=features.device), centre]
        if int(lengths.min()) < 2 * window + 1:
            raise ValueError(f"pool: a centre window of {2 * window + 1} positions needs rows at least that long, "
                             f"got a row of {int(lengths.min())}")
        pos = centre[:, None] + torch.arange(-window, window + 1, device=features.device)  # (batch, 2w + 1)
        return features.gather(1, pos[..., None].expand(-1, -1, features.shape[-1])).flatten(1)
    valid = (torch.arange(L, device=features.device)[None, :] < lengths[:, None])[..., None]
    if how == "mean":
        return (features * valid).sum(1) / lengths[:, None].to(features.dtype)
    if how == "max":
        return features.masked_fill(~valid, float("-inf")).amax(1)
    raise ValueError(f"pooling must be one of {POOLINGS}, got {how!r}")


@dataclass
class HeadConfig:
    """What sits on a backbone. task: "mlm" (logits over the vocabulary per position), "sequence" (one label per
    input, pooled), "token" (one label per position). ``backbone`` is the app's name for the backbone kind
    (validated by the app). Saved beside config.json as head.json."""

    task: str = "sequence"
    num_labels: int = 2
    pooling: str = "mean"
    backbone: str = ""
    labels: list[str] = field(default_factory=list)
    dropout: float = 0.0
    center_window: int = 0  # pooling "center": also this many positions each side, concatenated (see ``pool``)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"HeadConfig: task must be one of {TASKS}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"HeadConfig: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.center_window < 0 or (self.center_window and self.pooling != "center"):
            raise ValueError(f"HeadConfig: center_window must be >= 0 and needs pooling 'center', got "
                             f"{self.center_window} with pooling {self.pooling!r}")
        if self.task != "mlm" and self.num_labels < 1:
            raise ValueError(f"HeadConfig: num_labels must be >= 1, got {self.num_labels}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ValueError(f"HeadConfig: {len(self.labels)} label names for num_labels={self.num_labels}")
        self.labels = list(self.labels)


def pooled_width(head: HeadConfig, d: int) -> int:
    """Width of what ``pool`` returns for this head on d-wide features."""
    return d * (2 * head.center_window + 1)


def save_head_checkpoint(save_directory: str | os.PathLike, state_dict: dict[str, Tensor], config_json: str,
                         head: HeadConfig) -> Path:
    """Write model.safetensors, head.json and config.json (last: a folder with config.json is complete), each
    atomically, so an interrupted save leaves the previous checkpoint loadable."""
    from safetensors.torch import save_file

    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(out / WEIGHTS, lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write(out / HEAD_CONFIG, lambda p: Path(p).write_text(json.dumps(asdict(head), indent=2)))
    atomic_write(out / "config.json", lambda p: Path(p).write_text(config_json))
    return out


def read_head_config(path: str | os.PathLike) -> HeadConfig:
    """The HeadConfig of a classifier checkpoint folder; a missing or malformed head.json is a clear error."""
    head_path = Path(path) / HEAD_CONFIG
    if not head_path.is_file():
        raise FileNotFoundError(f"{path}: no {HEAD_CONFIG}; not a classifier checkpoint "
                                "(a language model folder loads with MambaLMHeadModel.from_pretrained)")
    try:
        return HeadConfig(**json.loads(head_path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{head_path}: invalid head config: {e}") from None


class ClassifierModule(pl.LightningModule):
    """Train a classifier network it is handed: ``net(inputs[, lengths]) -> logits`` (batch, K) or (batch, L, K).

    Logs train/loss, val/loss, val/acc, test/acc (accuracy over labelled positions; against the argmax of soft
    targets). ``label_smoothing`` applies to hard labels; soft targets (float labels) use soft cross-entropy.
    The optimizer is apps.common.optim's AdamW + warm-up + cosine. Subclasses that build ``net`` from their own
    arguments call ``self.save_hyperparameters()`` after ``super().__init__`` so checkpoints record those.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.05,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 label_smoothing: float = 0.0, pass_lengths: bool = True):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.model = net
        # kept as attributes, not read back from hparams: a subclass's save_hyperparameters() replaces those
        self.optim = {"lr": lr, "weight_decay": weight_decay, "betas": tuple(betas), "warmup_steps": warmup_steps,
                      "min_lr_ratio": min_lr_ratio}
        self.label_smoothing, self.pass_lengths = label_smoothing, pass_lengths

    def setup(self, stage: str) -> None:
        """The data's class names must match the head: a 3-class checkpoint never trains on 4-class data."""
        trainer = attached_trainer(self)
        names = getattr(getattr(trainer, "datamodule", None), "labels", None)
        head = getattr(self.model, "head_config", None)
        expected = head.num_labels if head is not None else getattr(self.model, "num_classes", None)
        if names is not None and expected is not None and len(names) != expected:
            raise ValueError(f"the model has {expected} classes but the data has {len(names)} "
                             f"({', '.join(map(str, names[:20]))})")
        if names is not None and head is not None and not head.labels:
            head.labels = list(names)

    @staticmethod
    def inputs_of(batch: dict) -> Tensor:
        return batch["inputs"] if "inputs" in batch else batch["input_ids"]

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        if self.pass_lengths:
            return self.model(inputs, lengths)
        return self.model(inputs)

    def loss_and_accuracy(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, int]:
        """(mean loss, accuracy, number of labelled positions)."""
        logits = logits.float()
        if labels.is_floating_point():  # soft targets (batch, K)
            loss = torch.sum(-labels * F.log_softmax(logits, -1), -1).mean()
            hard = labels.argmax(-1)
            return loss, (logits.argmax(-1) == hard).float().mean(), labels.shape[0]
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=-100,
                               label_smoothing=self.label_smoothing)
        keep = labels != -100
        n = int(keep.sum())
        acc = (logits.argmax(-1)[keep] == labels[keep]).float().mean() if n else logits.new_zeros(())
        return loss, acc, n

    def _step(self, batch: dict, split: str) -> Tensor:
        logits = self(self.inputs_of(batch), batch.get("lengths"))
        loss, acc, n = self.loss_and_accuracy(logits, batch["labels"])
        self.log(f"{split}/loss", loss, prog_bar=split == "train", batch_size=max(n, 1))
        self.log(f"{split}/acc", acc, prog_bar=split != "train", batch_size=max(n, 1))
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        return self._step(batch, "test")

    def predict_step(self, batch, batch_idx):
        return self(self.inputs_of(batch), batch.get("lengths")).softmax(-1)

    def configure_optimizers(self):
        return adamw_warmup_cosine(self, self.model, **self.optim)
