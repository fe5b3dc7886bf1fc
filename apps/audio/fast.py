"""The whole U-Net's recurrent step in compiled C++ (csrc/unet_step.cpp): no Python per layer, one call per
sample for the whole batch (rows in parallel on torch's intra-op threads).

Built with torch.utils.cpp_extension on first use (about 30 s; cached under ~/.cache/hiss/audio_step/<hash>, or
$HISS_AUDIO_STEP_CACHE). Covers U-Nets of Mamba and LTI blocks (with or without gated MLPs), conditional or
not; a model with attention blocks, or a machine that cannot build it (no C++ compiler, HISS_DISABLE_KERNELS
set), uses the Python step (``fast_supported`` says which, ``fast_unavailable_reason`` why). The result equals
``AudioUNet.step`` up to float rounding (tests/apps/audio).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from ssm_core import Mamba

from .model import AudioUNet, UNetState

__all__ = ["FastStepper", "fast_supported", "fast_unavailable_reason", "load_extension"]

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "unet_step.cpp"
_CFLAGS = ["-O3", "-std=c++17", "-ffast-math", "-fopenmp-simd"]
_lock = threading.Lock()
_ext = None
_reason: str | None = None


def _build_dir() -> Path:
    h = hashlib.sha256(_SRC.read_bytes())
    for part in (torch.__version__, sys.version, " ".join(_CFLAGS)):
        h.update(part.encode())
    base = os.environ.get("HISS_AUDIO_STEP_CACHE") or Path.home() / ".cache" / "hiss" / "audio_step"
    return Path(base) / h.hexdigest()[:16]


def load_extension():
    """The compiled module; raises RuntimeError with the reason when it cannot be built."""
    global _ext, _reason
    with _lock:
        if _ext is not None:
            return _ext
        if _reason is not None:
            raise RuntimeError(_reason)
        try:
            if os.environ.get("HISS_DISABLE_KERNELS", "").strip() not in ("", "0"):
                raise RuntimeError("disabled by HISS_DISABLE_KERNELS")
            if shutil.which(os.environ.get("CXX", "c++")) is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            from torch.utils import cpp_extension

            folder = _build_dir()
            folder.mkdir(parents=True, exist_ok=True)
            _ext = cpp_extension.load(name=f"hiss_audio_unet_step_{folder.name}", sources=[str(_SRC)],
                                      extra_cflags=_CFLAGS, build_directory=str(folder), with_cuda=False,
                                      verbose=False)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the Python step, and say why
            _reason = f"{type(e).__name__}: {e}"
            log.warning("compiled audio step unavailable (%s); using the Python step", _reason)
            raise RuntimeError(_reason) from e
        return _ext


def fast_unavailable_reason(model: AudioUNet) -> str | None:
    """None if the compiled step can run this model, else why not."""
    if model.head.weight.device.type != "cpu" or model.head.weight.dtype != torch.float32:
        return "the compiled step runs fp32 models on the CPU"
    if any(not isinstance(b.mixer, Mamba) for b in model.blocks_in_order()):
        return "attention blocks are stepped in Python"
    try:
        load_extension()
    except RuntimeError as e:
        return str(e)
    return None


def fast_supported(model: AudioUNet) -> bool:
    return fast_unavailable_reason(model) is None


def _t(x: Tensor | None) -> Tensor:
    return x.detach().float().contiguous() if x is not None else torch.empty(0)


class FastStepper:
    """Holds a copy of the model's weights and a state in C++; ``step(tokens (B,)) -> logits (B, vocab)``.
    Built from a UNetState (e.g. after ``generate.prefill``); weights changed later are not seen."""

    def __init__(self, model: AudioUNet, state: UNetState, label=None):
        reason = fast_unavailable_reason(model)
        if reason:
            raise RuntimeError(f"compiled step unavailable: {reason}")
        ext = load_extension()
        c = model.config
        S = len(c.pool)
        batch = state.buffers[0].shape[0] if S else state.blocks[0].conv.shape[0]
        self.batch = batch
        self.net = ext.UNetStep(list(c.pool), [c.width(s) for s in range(S + 1)], batch)
        self.net.set_io(_t(model.embedding.weight), _t(model.norm_f.weight), float(model.norm_f.eps),
                        _t(model.head.weight), _t(model.head.bias))
        for s in range(S):
            dp, up = model.down_pool[s].linear, model.up_pool[s].linear
            self.net.set_pool(s, _t(dp.weight), _t(dp.bias), _t(up.weight), _t(up.bias))
        cond = model.conditioning(label, batch)
        for s in range(S + 1):
            self.net.set_cond(s, _t(cond[s]) if cond is not None else torch.empty(0))
        places = [(0, s) for s in range(S) for _ in model.down[s]] + [(1, S)] * len(model.center)
        places += [(2, s) for s in reversed(range(S)) for _ in model.up[s]]
        for (where, level), block, st in zip(places, model.blocks_in_order(), state.blocks):
            self._add(where, level, block, st)
        self.net.set_position(state.t, [_t(b) for b in state.buffers], [_t(p) for p in state.pending])

    def _add(self, where: int, level: int, block: nn.Module, st) -> None:
        m: Mamba = block.mixer
        sel = m.selective
        mlp = block.mlp
        self.net.add_block(
            where, level, sel, _t(block.norm.weight), float(block.norm.eps), _t(m.in_proj.weight),
            _t(m.in_proj.bias), _t(m.conv1d.weight.squeeze(1)), _t(m.conv1d.bias),
            _t(m.x_proj.weight) if sel else torch.empty(0), _t(m.dt_proj.weight) if sel else torch.empty(0),
            _t(m.dt_proj.bias if sel else m.dt_bias), _t(None if sel else m.B), _t(None if sel else m.C),
            _t(-torch.exp(m.A_log.float())), _t(m.D), _t(m.out_proj.weight), _t(m.out_proj.bias),
            _t(block.norm2.weight) if mlp is not None else torch.empty(0),
            float(block.norm2.eps) if mlp is not None else 1e-5,
            _t(mlp.fc1.weight) if mlp is not None else torch.empty(0),
            _t(mlp.fc2.weight) if mlp is not None else torch.empty(0),
            _t(st.conv), _t(st.ssm))

    @property
    def t(self) -> int:
        return int(self.net.position())

    def step(self, tokens: Tensor) -> Tensor:
        return self.net.step(tokens)
