"""The one way an app loads a trained model: an exported folder (``save_pretrained``: hiss, mamba_ssm or Hugging
Face language models), a classifier folder (adds head.json; the app names its class), or a Lightning ``.ckpt``
(the app names its LightningModule; the network is its ``.model``). Always on the CPU, in eval mode, weights only
(safetensors, or Lightning's checkpoint through torch.load(weights_only=True): a pickle payload is refused).
"""

from __future__ import annotations

import inspect
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from ssm_core import CorruptFileError, MambaLMHeadModel

from .classify import HEAD_CONFIG

__all__ = ["load_model", "is_classifier_dir", "read_lightning_checkpoint", "check_checkpoint_fits"]


def read_lightning_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning ``.ckpt`` as a dict, tensors memory-mapped (cheap), weights only: pickled code is refused.

    Errors name the file: missing (FileNotFoundError), a folder (IsADirectoryError), truncated or not a
    checkpoint (``ssm_core.CorruptFileError``), holding more than plain data (ValueError, nothing is run).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a Lightning .ckpt file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            first = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
            raise ValueError(f"{path}: refused to load: it holds more than plain tensors and containers, and hiss "
                             f"never runs pickled code ({first or 'not weights only'})") from None
        raise _corrupt(path, e) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise _corrupt(path, e) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        what = f"a {type(ckpt).__name__}" + (f" with keys {sorted(ckpt)[:6]}" if isinstance(ckpt, dict) else "")
        raise CorruptFileError(f"{path}: not a Lightning checkpoint ({what}, no 'state_dict')")
    return ckpt


def _corrupt(path: Path, e: BaseException) -> CorruptFileError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    size = path.stat().st_size
    return CorruptFileError(f"{path}: cannot read this Lightning checkpoint ({size:,} bytes): it is corrupt or "
                            f"truncated (an interrupted copy or save?) [{reason[:200]}]; use another checkpoint, "
                            "e.g. the run's checkpoints/last.ckpt")


def _accepted(cls: type) -> set[str] | None:
    """The keyword arguments ``cls.__init__`` takes, None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.name != "self"}


def check_checkpoint_fits(path: str | os.PathLike, model_class: type | None = None,
                          datamodule_class: type | None = None) -> dict:
    """Read ``path`` (``read_lightning_checkpoint``) and refuse, by name, a checkpoint of another kind of run:
    one whose saved model or data-module arguments this command's classes do not take (a text run's checkpoint
    given to the genomics trainer, say). Returns the checkpoint."""
    ckpt = read_lightning_checkpoint(path)
    for key, cls in (("datamodule_hyper_parameters", datamodule_class), ("hyper_parameters", model_class)):
        saved = {k for k in ckpt.get(key) or {} if not k.startswith("_")}
        accepted = _accepted(cls) if cls is not None else None
        if accepted is not None and saved - accepted:
            extra = sorted(saved - accepted)
            raise ValueError(f"{path}: a checkpoint of another kind of run: it was saved with "
                             f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which {cls.__name__} does "
                             f"not take; give this command a checkpoint it wrote")
    return ckpt


def is_classifier_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def load_model(path: str | os.PathLike, *, head_model: type | None = None, lightning_module: type | None = None,
               vocab_range: tuple[int, int] | None = None, what: str = "model",
               model_class: type = MambaLMHeadModel) -> nn.Module:
    """Load ``path`` (see the module docstring).

    model_class: what an exported folder without head.json holds (``from_pretrained(dir)``); a language model by
    default, the app's own network otherwise (audio's U-Net).
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
        check_checkpoint_fits(path, lightning_module)  # a clear line for a corrupt file or another app's .ckpt
        model = lightning_module.load_from_checkpoint(path, map_location="cpu").model
    elif path.is_dir() and is_classifier_dir(path):
        if head_model is None:
            raise ValueError(f"{path}: a classifier checkpoint ({HEAD_CONFIG}); this command needs a language model")
        model = head_model.from_pretrained(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = model_class.from_pretrained(path)
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
