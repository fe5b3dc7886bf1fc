"""The one way an app loads a trained model: an exported folder (``save_pretrained``: hiss, mamba_ssm or Hugging
Face language models), a classifier folder (adds head.json; the app names its class), or a Lightning ``.ckpt``
(the app names its LightningModule; the network is its ``.model``). Always on the CPU, in eval mode, weights only
(safetensors, or Lightning's checkpoint through torch.load(weights_only=True): a pickle payload is refused).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ssm_core import MambaLMHeadModel

from .classify import HEAD_CONFIG

__all__ = ["load_model", "is_classifier_dir"]


def is_classifier_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def load_model(path: str | os.PathLike, *, head_model: type | None = None, lightning_module: type | None = None,
               vocab_range: tuple[int, int] | None = None, what: str = "model") -> nn.Module:
    """Load ``path`` (see the module docstring).

    head_model: the app's classifier class (``from_pretrained(dir)``) for folders with head.json; without one such
    a folder is an error saying a language model was expected. lightning_module: the app's LightningModule class
    for ``.ckpt`` files. vocab_range: (lo, hi) inclusive bounds a language model's vocabulary must fall in (a byte
    model has 256..259), so a checkpoint of another app is refused by name, not by a shape error later.
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".ckpt":
        if lightning_module is None:
            raise ValueError(f"{path}: a Lightning checkpoint; this command reads exported folders "
                             "(save_pretrained: config.json + model.safetensors)")
        model = lightning_module.load_from_checkpoint(path, map_location="cpu").model
    elif path.is_dir() and is_classifier_dir(path):
        if head_model is None:
            raise ValueError(f"{path}: a classifier checkpoint ({HEAD_CONFIG}); this command needs a language model")
        model = head_model.from_pretrained(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = MambaLMHeadModel.from_pretrained(path)
    elif path.is_dir():
        raise FileNotFoundError(f"{path}: no config.json; not an exported {what} folder (save_pretrained writes "
                                "config.json + model.safetensors)")
    else:
        raise FileNotFoundError(f"{path}: no such {what} folder or Lightning .ckpt file")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if vocab_range is not None and vocab is not None and not vocab_range[0] <= vocab <= vocab_range[1]:
        lo, hi = vocab_range
        raise ValueError(f"{path}: vocab_size {vocab}: not a {what} (expected a vocabulary of {lo}"
                         f"{'' if lo == hi else f'..{hi}'} ids)")
    return model.eval()
