"""The whole U-Net's recurrent step in compiled C++ (csrc/unet_step.cpp), with sampling: many samples per call.

``FastStepper.sample(T, temperature, top_k, top_p)`` runs T steps for the whole batch in one call: step, logits,
temperature / top-k / top-p, a draw from a per-row seeded generator, the drawn µ-law class fed back in. The rows
of a batch go through each layer together (every Linear a small GEMM: a weight is read once per step for all
rows), and with ``threads`` > 1 the batch is split into groups of rows that run all T steps independently.
``step(tokens)`` (one teacher-forced step returning the logits) is the reference path's building block.

**Generator.** Each row draws from its own xoshiro256** generator (Blackman & Vigna), seeded with splitmix64 from
(seed, row index): reproducible from the seed, independent of the batch size and thread count. It is *not*
torch's generator, so the samples differ from the Python path's (``generate(..., fast=False)``) for the same
seed; the distribution is the same (softmax of the tempered, top-k / top-p filtered logits, the rules of
ssm_core's ``sample_logits``; tested with many draws in tests/apps/audio/test_fast_sampling.py). Temperature 0
(or top_k 1) is the argmax, as in the Python path.

**Build.** The source has no torch headers: it is built with the system C++ compiler on first use (a few seconds;
cached under ~/.cache/hiss/audio_step/<hash of source, flags, compiler, CPU>, or $HISS_AUDIO_STEP_CACHE) and called
through ctypes, which releases the GIL. It is built with ``-march=native`` (AVX2 / AVX-512 vectors: the
GEMM tiles and the vectorised exp / log are 2-4x wider than the x86-64 baseline's SSE2), so the cache key
includes the CPU's model and feature flags; if the compiler rejects ``-march=native``, or
HISS_AUDIO_STEP_PORTABLE=1 is set, the portable build (baseline ISA of the compiler's target) is used. It covers
U-Nets of Mamba and LTI blocks (with or without gated MLPs), conditional or not. A model with attention blocks,
complex-valued A, Δ hooks, a non-CPU device, or a machine that cannot build it (no C++ compiler, or
HISS_DISABLE_KERNELS set) uses the Python step: ``fast_unavailable_reason`` says why. Logits equal
``AudioUNet.step``'s up to float rounding (tests/apps/audio).
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
from ssm_core.models.sampling import is_greedy

__all__ = ["FastStepper", "fast_supported", "fast_unavailable_reason", "load_library", "compiled_draws",
           "build_info"]

log = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "unet_step.cpp"
# no -ffast-math: a shared object linked with it sets flush-to-zero for the whole process when it loads (the
# source vectorises exp / log itself, so it does not need libm's fast-math vector variants)
_FLAGS = ["-O3", "-std=c++17", "-fno-math-errno", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC"]
_NATIVE = ["-march=native"]
_lock = threading.Lock()
_lib = None
_reason: str | None = None
_built_flags: list[str] = []


def _cpu_id() -> str:
    """What -march=native resolves to depends on the CPU: its model and feature flags go into the cache key, so
    a cache shared between machines (e.g. an NFS home) never hands one CPU another's build."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features", "CPU part"))]
        return "\n".join(sorted(set(keep))) or platform.processor()
    except OSError:
        return platform.processor() or platform.machine()


def _build_path(flags: list[str]) -> Path:
    cxx = os.environ.get("CXX", "c++")
    h = hashlib.sha256(_SRC.read_bytes())
    for part in (cxx, " ".join(flags), platform.machine(), sys.platform, _cpu_id() if _NATIVE[0] in flags else ""):
        h.update(part.encode())
    base = os.environ.get("HISS_AUDIO_STEP_CACHE") or Path.home() / ".cache" / "hiss" / "audio_step"
    return Path(base) / h.hexdigest()[:16] / "unet_step.so"


def _build(cxx: str, flags: list[str]) -> Path:
    so = _build_path(flags)
    if not so.is_file():
        so.parent.mkdir(parents=True, exist_ok=True)
        tmp = so.with_name(f".{so.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        r = subprocess.run([cxx, *flags, "-o", str(tmp), str(_SRC)], capture_output=True, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{cxx} failed to build {_SRC.name}: {r.stderr.strip()[-2000:]}")
        os.replace(tmp, so)  # atomic: a concurrent build or a crash never leaves half a library
    return so


def load_library() -> ctypes.CDLL:
    """The compiled library (built on first use); RuntimeError with the reason when it cannot be built."""
    global _lib, _reason, _built_flags
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
            attempts = [_FLAGS]
            if os.environ.get("HISS_AUDIO_STEP_PORTABLE", "").strip() in ("", "0"):
                attempts.insert(0, _FLAGS + _NATIVE)
            for i, flags in enumerate(attempts):
                try:
                    so = _build(cxx, flags)
                    break
                except RuntimeError as e:
                    if i + 1 == len(attempts):
                        raise
                    log.info("native build failed, building the portable one (%s)", str(e)[-200:])
            # the library's own OpenMP runtime reads this when it loads: threads that sleep between calls
            # instead of spinning, so a busy machine (or torch's own threads) is not slowed down by idle spinners
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            lib = ctypes.CDLL(str(so))
            i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
            lib.unet_create.restype = vp
            lib.unet_create.argtypes = [vp, i64, vp, i64, ctypes.c_char_p, i64]
            lib.unet_step.restype = ctypes.c_int
            lib.unet_step.argtypes = [vp, vp, vp, ctypes.c_int]
            lib.unet_run.restype = ctypes.c_int
            lib.unet_run.argtypes = [vp, vp, i64, i64, f32, i64, f32, vp, ctypes.c_int, ctypes.c_int]
            lib.unet_seed.restype = None
            lib.unet_seed.argtypes = [vp, ctypes.c_uint64]
            lib.unet_sample_many.restype = i64
            lib.unet_sample_many.argtypes = [vp, i64, i64, f32, i64, f32, ctypes.c_uint64, vp]
            lib.unet_position.restype = i64
            lib.unet_position.argtypes = [vp]
            lib.unet_simd_width.restype = ctypes.c_int
            lib.unet_simd_width.argtypes = []
            lib.unet_destroy.restype = None
            lib.unet_destroy.argtypes = [vp]
            _lib, _built_flags = lib, flags
        except (RuntimeError, OSError) as e:
            _reason = str(e)
            log.warning("compiled audio step unavailable (%s); using the Python step", _reason)
            raise RuntimeError(_reason) from e
        return _lib


def build_info() -> str:
    """How the library was built, e.g. '-march=native, 16 floats per vector' (for benchmark reports)."""
    lib = load_library()
    isa = "-march=native" if _NATIVE[0] in _built_flags else "portable"
    return f"{isa}, {lib.unet_simd_width()} floats per vector"


def fast_unavailable_reason(model: AudioUNet) -> str | None:
    """None if the compiled step can run this model, else why not."""
    if model.head.weight.device.type != "cpu":
        return "the compiled step runs on the CPU"
    mixers = [b.mixer for b in model.blocks_in_order()]
    if any(not isinstance(m, Mamba) for m in mixers):
        return "attention blocks are stepped in Python"
    if any(m.complex_A for m in mixers):
        return "complex-valued A is stepped in Python"
    if any(m.has_delta_hooks for m in mixers):  # the compiled step has no Δ hook: skipping one changes the output
        return "a Mamba block has a Δ hook (the compiled step would skip it)"
    try:
        load_library()
    except RuntimeError as e:
        return str(e)
    return None


def fast_supported(model: AudioUNet) -> bool:
    return fast_unavailable_reason(model) is None


def _sampling_args(temperature: float, top_k: int, top_p: float) -> tuple[float, int, float]:
    """ssm_core's checks (ValueError for bad settings); greedy settings become temperature 0."""
    if is_greedy(temperature, top_k, top_p):
        return 0.0, 0, 0.0
    return float(temperature), int(top_k), float(top_p)


def compiled_draws(logits: Tensor, n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
                   seed: int = 0) -> Tensor:
    """n tokens (n,) drawn by the compiled sampler from one logits vector (vocab,), with the generator a batch's
    row 0 gets for ``seed``: the sampler alone, to check its distribution."""
    lib = load_library()
    temperature, top_k, top_p = _sampling_args(temperature, top_k, top_p)
    lg = np.ascontiguousarray(logits.detach().float().cpu().numpy().reshape(-1))
    out = np.empty(n, np.int64)
    lib.unet_sample_many(lg.ctypes.data, lg.size, n, temperature, top_k, top_p, seed & (2**64 - 1),
                         out.ctypes.data)
    return torch.from_numpy(out)


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
    """A copy of the model's weights and a state in C++. Built from a UNetState (e.g. after a parallel prefill);
    weights changed later are not seen.

    ``step(tokens (B,)) -> logits (B, vocab)``: one teacher-forced step. ``feed(tokens (B, L))``: L teacher-forced
    steps in one call (a prompt's tail). ``sample(T, temperature, top_k, top_p)``: T sampled steps in one call ->
    tokens (B, T). ``threads``: OpenMP threads, each running a group of rows through all T steps (default 1: the
    machine these numbers come from is shared, see docs/audio.md). ``seed``: of the per-row generators (None:
    drawn from torch's global generator, so ``torch.manual_seed`` makes runs repeatable)."""

    def __init__(self, model: AudioUNet, state: UNetState, label=None, threads: int | None = None,
                 seed: int | None = None):
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
        self.reseed(seed)

    @property
    def t(self) -> int:
        return int(self._lib.unet_position(self._h))

    def reseed(self, seed: int | None) -> None:
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        self._lib.unet_seed(self._h, int(seed) & (2**64 - 1))

    def _tokens(self, tokens: Tensor, what: str) -> np.ndarray:
        tok = np.ascontiguousarray(torch.as_tensor(tokens).detach().cpu().numpy(), dtype=np.int64)
        if tok.shape[0] != self.batch:
            raise ValueError(f"{what}: expected {self.batch} rows of tokens, got shape {tuple(tok.shape)}")
        return tok

    def step(self, tokens: Tensor) -> Tensor:
        tok = self._tokens(tokens, "step").reshape(-1)
        if tok.size != self.batch:
            raise ValueError(f"step: expected {self.batch} tokens, got {tok.size}")
        logits = np.empty((self.batch, self.vocab), np.float32)
        if self._lib.unet_step(self._h, tok.ctypes.data, logits.ctypes.data, self.threads) != 0:
            raise ValueError(f"step: token out of range 0..{self.vocab - 1}: {tok.tolist()}")
        return torch.from_numpy(logits)

    def feed(self, tokens: Tensor) -> None:
        """Teacher-force tokens (B, L); the next ``sample`` draws from the logits after the last one."""
        tok = self._tokens(tokens, "feed").reshape(self.batch, -1)
        rc = self._lib.unet_run(self._h, tok.ctypes.data, tok.shape[1], 0, 1.0, 0, 0.0, None, 1, self.threads)
        if rc != 0:
            raise ValueError(f"feed: token out of range 0..{self.vocab - 1}")

    def sample(self, n: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0,
               feed_last: bool = True) -> Tensor:
        """n samples per row (B, n): each drawn from the current logits and fed back (the last one only if
        ``feed_last``: leave it False for the final chunk, whose last sample needs no next logits)."""
        if n < 0:
            raise ValueError(f"sample: n must be >= 0, got {n}")
        temperature, top_k, top_p = _sampling_args(temperature, top_k, top_p)
        out = np.empty((self.batch, n), np.int64)
        rc = self._lib.unet_run(self._h, None, 0, n, temperature, top_k, top_p, out.ctypes.data, int(feed_last),
                                self.threads)
        if rc == -2:
            raise RuntimeError("sample: no logits yet (feed at least one token first)")
        if rc != 0:
            raise RuntimeError(f"sample: compiled step failed ({rc})")
        return torch.from_numpy(out)

    def __del__(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            self._lib.unet_destroy(h)
