"""The whole U-Net's recurrent step in compiled C++ (csrc/unet_step.cpp): no Python per layer, one call per
sample for the whole batch (rows in parallel with OpenMP).

The source has no torch headers: it is built with the system C++ compiler on first use in about 2 seconds
(cached under ~/.cache/hiss/audio_step/<hash of source, flags, machine>, or $HISS_AUDIO_STEP_CACHE) and called
through ctypes, which releases the GIL. It covers U-Nets of Mamba and LTI blocks (with or without gated MLPs),
conditional or not. A model with attention blocks, or a machine that cannot build it (no C++ compiler, or
HISS_DISABLE_KERNELS set), uses the Python step: ``fast_unavailable_reason`` says why. The result equals
``AudioUNet.step`` up to float rounding (tests/apps/audio).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from apps.audio.model import AudioUNet, UNetState
from ssm_core import Mamba

__all__ = ["FastStepper", "fast_supported", "fast_unavailable_reason", "load_library"]

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "unet_step.cpp"
# no -ffast-math: a shared object linked with it sets flush-to-zero for the whole process when it loads
_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
_lock = threading.Lock()
_lib = None
_reason: str | None = None


def _build_path() -> Path:
    cxx = os.environ.get("CXX", "c++")
    h = hashlib.sha256(_SRC.read_bytes())
    for part in (cxx, " ".join(_FLAGS), platform.machine(), sys.platform):
        h.update(part.encode())
    base = os.environ.get("HISS_AUDIO_STEP_CACHE") or Path.home() / ".cache" / "hiss" / "audio_step"
    return Path(base) / h.hexdigest()[:16] / "unet_step.so"


def load_library() -> ctypes.CDLL:
    """The compiled library (built on first use); RuntimeError with the reason when it cannot be built."""
    global _lib, _reason
    with _lock:
        if _lib is not None:
            return _lib
        if _reason is not None:
            raise RuntimeError(_reason)
        try:
            if os.environ.get("HISS_DISABLE_KERNELS", "").strip() not in ("", "0"):
                raise RuntimeError("disabled by HISS_DISABLE_KERNELS")
            cxx = os.environ.get("CXX", "c++")
            if shutil.which(cxx) is None:
                raise RuntimeError(f"no C++ compiler found (looked for {cxx!r}; set CXX or install g++)")
            so = _build_path()
            if not so.is_file():
                so.parent.mkdir(parents=True, exist_ok=True)
                tmp = so.with_name(f".{so.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
                r = subprocess.run([cxx, *_FLAGS, "-o", str(tmp), str(_SRC)], capture_output=True, text=True)
                if r.returncode != 0:
                    tmp.unlink(missing_ok=True)
                    raise RuntimeError(f"{cxx} failed to build {_SRC.name}: {r.stderr.strip()[-2000:]}")
                os.replace(tmp, so)  # atomic: a concurrent build or a crash never leaves half a library
            # the library's own OpenMP runtime reads this when it loads: threads that sleep between steps
            # instead of spinning, so a busy machine (or torch's own threads) is not slowed down by idle spinners
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            lib = ctypes.CDLL(str(so))
            lib.unet_create.restype = ctypes.c_void_p
            lib.unet_create.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_char_p, ctypes.c_int64]
            lib.unet_step.restype = ctypes.c_int
            lib.unet_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            lib.unet_position.restype = ctypes.c_int64
            lib.unet_position.argtypes = [ctypes.c_void_p]
            lib.unet_destroy.restype = None
            lib.unet_destroy.argtypes = [ctypes.c_void_p]
            _lib = lib
        except (RuntimeError, OSError) as e:
            _reason = str(e)
            log.warning("compiled audio step unavailable (%s); using the Python step", _reason)
            raise RuntimeError(_reason) from e
        return _lib


def fast_unavailable_reason(model: AudioUNet) -> str | None:
    """None if the compiled step can run this model, else why not."""
    if model.head.weight.device.type != "cpu":
        return "the compiled step runs on the CPU"
    if any(not isinstance(b.mixer, Mamba) for b in model.blocks_in_order()):
        return "attention blocks are stepped in Python"
    try:
        load_library()
    except RuntimeError as e:
        return str(e)
    return None


def fast_supported(model: AudioUNet) -> bool:
    return fast_unavailable_reason(model) is None


class _Packer:
    """ints (sizes, flags) and floats (weights, states) in the order csrc/unet_step.cpp reads them."""

    def __init__(self):
        self.ints: list[int] = []
        self.floats: list[np.ndarray] = []

    def i(self, *values: int) -> None:
        self.ints.extend(int(v) for v in values)

    def v(self, x: Tensor | float | None) -> None:
        if x is None:
            arr = np.zeros(0, np.float32)
        elif isinstance(x, Tensor):
            arr = x.detach().float().contiguous().cpu().numpy().reshape(-1)
        else:
            arr = np.array([x], np.float32)
        self.i(arr.size)
        self.floats.append(arr)

    def linear(self, lin: nn.Linear) -> None:
        self.i(lin.out_features, lin.in_features)
        self.v(lin.weight)
        self.v(lin.bias)


def _pack(model: AudioUNet, state: UNetState, label) -> _Packer:
    c = model.config
    S = len(c.pool)
    batch = state.blocks[0].conv.shape[0]
    p = _Packer()
    p.i(S, batch, state.t, *[c.width(s) for s in range(S + 1)], *c.pool)
    p.v(model.embedding.weight)
    p.v(model.norm_f.weight)
    p.v(float(model.norm_f.eps))
    p.linear(model.head)
    for s in range(S):
        p.linear(model.down_pool[s].linear)
        p.linear(model.up_pool[s].linear)
    cond = model.conditioning(label, batch)
    for s in range(S + 1):
        p.v(cond[s] if cond is not None else None)
    places = [(0, s) for s in range(S) for _ in model.down[s]] + [(1, S)] * len(model.center)
    places += [(2, s) for s in reversed(range(S)) for _ in model.up[s]]
    blocks = model.blocks_in_order()
    p.i(len(blocks))
    for (where, level), block, st in zip(places, blocks, state.blocks):
        m: Mamba = block.mixer
        mlp = block.mlp
        p.i(where, level, m.selective, mlp is not None, m.d_model, m.d_inner, m.d_state, m.d_conv)
        p.v(block.norm.weight)
        p.v(float(block.norm.eps))
        p.linear(m.in_proj)
        p.v(m.conv1d.weight.squeeze(1))
        p.v(m.conv1d.bias)
        if m.selective:
            p.linear(m.x_proj)
            p.linear(m.dt_proj)
        else:
            p.v(m.dt_bias)
            p.v(m.B)
            p.v(m.C)
        p.v(-torch.exp(m.A_log.float()))
        p.v(m.D)
        p.linear(m.out_proj)
        if mlp is not None:
            p.v(block.norm2.weight)
            p.v(float(block.norm2.eps))
            p.linear(mlp.fc1)
            p.linear(mlp.fc2)
        p.v(st.conv)
        p.v(st.ssm)
    for s in range(S):
        p.v(state.buffers[s])
        p.v(state.pending[s])
    return p


class FastStepper:
    """A copy of the model's weights and a state in C++; ``step(tokens (B,)) -> logits (B, vocab)``.
    Built from a UNetState (e.g. after ``generate.prefill``); weights changed later are not seen.
    ``threads``: OpenMP threads over the batch rows (default 1: on the shared two-core machine two threads were
    slower than one at every batch size, see docs/audio.md)."""

    def __init__(self, model: AudioUNet, state: UNetState, label=None, threads: int | None = None):
        reason = fast_unavailable_reason(model)
        if reason:
            raise RuntimeError(f"compiled step unavailable: {reason}")
        self._lib = load_library()
        p = _pack(model, state, label)
        ints = np.asarray(p.ints, dtype=np.int64)
        floats = np.concatenate(p.floats) if p.floats else np.zeros(0, np.float32)
        err = ctypes.create_string_buffer(512)
        handle = self._lib.unet_create(ints.ctypes.data, ints.size, floats.ctypes.data, floats.size, err, 512)
        if not handle:
            raise RuntimeError(f"compiled step: {err.value.decode()}")
        self._h = handle
        self.batch = state.blocks[0].conv.shape[0]
        self.vocab = model.config.vocab_size
        self.threads = threads or 1
        self._logits = None

    @property
    def t(self) -> int:
        return int(self._lib.unet_position(self._h))

    def step(self, tokens: Tensor) -> Tensor:
        tok = np.ascontiguousarray(tokens.detach().cpu().numpy(), dtype=np.int64).reshape(-1)
        if tok.size != self.batch:
            raise ValueError(f"step: expected {self.batch} tokens, got {tok.size}")
        logits = np.empty((self.batch, self.vocab), np.float32)
        if self._lib.unet_step(self._h, tok.ctypes.data, logits.ctypes.data, self.threads) != 0:
            raise ValueError(f"step: token out of range 0..{self.vocab - 1}: {tok.tolist()}")
        return torch.from_numpy(logits)

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.unet_destroy(h)
