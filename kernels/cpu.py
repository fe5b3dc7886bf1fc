"""Compiled CPU kernels: selective scan (Mamba-1) fwd + bwd, complex-A scan fwd + bwd, causal conv1d fwd +
bwd + decode step (channel-major; fwd + bwd time-major too), (gated) RMSNorm fwd + bwd, and the decode-step
selective state update (Mamba-1 and Mamba-2 layouts).

One extension module, so the ~60 s parse of ``torch/extension.h`` is paid once: the C++ translation
unit ``csrc/selective_scan_cpu.cpp`` includes ``csrc/causal_conv1d_cpu.h``, ``csrc/conv_time_major_cpu.h``,
``csrc/rms_norm_cpu.h``, ``csrc/state_update_cpu.h`` and ``csrc/complex_scan_cpu.h`` (SIMD helpers in
``csrc/simd.h``; loads, checks and ISA dispatch shared by the kernels in ``csrc/common.h``). It is compiled with
``torch.utils.cpp_extension.load`` the first time it is needed and cached under ``$HISS_KERNEL_CACHE`` (default
``~/.cache/hiss/kernels``) in a folder named by a hash of the source, the flags, torch's and
Python's versions, so a later process just loads the built module. Importing this module never
compiles and never raises: ``available()`` tries the build once and, on failure (no compiler, no
ninja, a compile error, ``HISS_DISABLE_KERNELS=1``), returns False and keeps the reason in
``unavailable_reason()``.

Each public function has the signature, semantics and return values of its ``ssm_core.ops`` twin:
``selective_scan_cpu`` (differentiable in every input, the initial state included, and through the
last state), ``complex_scan_cpu`` (the complex-A scan, likewise), ``causal_conv1d_cpu`` (differentiable,
through the final state too), ``causal_conv1d_update_cpu`` and ``selective_state_update_cpu`` (decode steps,
in place, no autograd).
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch
from torch import Tensor

from .build_lock import build_lock
from .shape_checks import (
    check_complex_scan,
    check_conv,
    check_conv_update,
    check_scan,
    check_scan_time_major,
    check_ssd,
    check_state_update,
    pad_time_major,
    per_token,
    run_channel_major,
)

__all__ = [
    "available",
    "unavailable_reason",
    "load",
    "build_dir",
    "selective_scan_cpu",
    "selective_scan_time_major_cpu",
    "complex_scan_cpu",
    "causal_conv1d_cpu",
    "causal_conv1d_time_major_cpu",
    "rms_norm_gated_cpu",
    "causal_conv1d_update_cpu",
    "selective_state_update_cpu",
    "mamba_chunk_scan_combined_cpu",
    "decode_model_cpu",
    "DEFAULT_CHUNK",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SRC = _CSRC / "selective_scan_cpu.cpp"  # the one translation unit; it includes the headers beside it
# No -ffast-math / -march=native: exp and softplus keep IEEE semantics, and the cached build is not
# tied to the build host's CPU. The AVX2+FMA variant is selected at run time inside the module.
_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-psabi", "-fno-math-errno"]
_LDFLAGS = ["-fopenmp"]

# Time steps between saved states: memory for backward is (batch, dim, L / DEFAULT_CHUNK, N).
DEFAULT_CHUNK = 64

_lock = threading.Lock()
_ext = None
_reason: str | None = None
_tried = False


def _key() -> str:
    h = hashlib.sha256()
    for f in sorted(_CSRC.glob("*.[ch]*")):  # the .cpp and every header it includes
        h.update(f.name.encode() + f.read_bytes())
    for part in (torch.__version__, sys.version, platform.machine(), " ".join(_CFLAGS + _LDFLAGS)):
        h.update(part.encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    """Folder holding the built module for this source / torch / Python."""
    base = os.environ.get("HISS_KERNEL_CACHE") or os.path.join(Path.home(), ".cache", "hiss", "kernels")
    return Path(base) / _key()


def _build():
    if os.environ.get("HISS_DISABLE_KERNELS", "").strip() not in ("", "0"):
        raise RuntimeError("disabled by HISS_DISABLE_KERNELS")
    if not _SRC.is_file():
        raise RuntimeError(f"kernel source missing: {_SRC}")
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler found (looked for {cxx!r}; set CXX or install g++)")
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is required to build the kernels (pip install ninja)")
    folder = build_dir()
    with build_lock(folder):  # a killed earlier build cannot leave this waiting forever (kernels/build_lock.py)
        return cpp_extension.load(
            name=f"hiss_selective_scan_cpu_{folder.name}",
            sources=[str(_SRC)],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(folder),
            with_cuda=False,
            verbose=os.environ.get("HISS_KERNEL_VERBOSE", "") not in ("", "0"),
        )


def load():
    """The compiled module (building it on first use); raises RuntimeError with the reason if it can't."""
    global _ext, _reason, _tried
    if _ext is not None:
        return _ext
    with _lock:
        if not _tried:
            _tried = True
            try:
                _ext = _build()
            except BaseException as exc:  # noqa: BLE001 - any failure means "not available"
                if isinstance(exc, KeyboardInterrupt):
                    _tried = False
                    raise
                msg = f"{type(exc).__name__}: {exc}".strip()
                _reason = msg if len(msg) <= 4000 else "..." + msg[-4000:]
    if _ext is None:
        raise RuntimeError(f"hiss CPU kernels unavailable: {_reason}")
    return _ext


def available() -> bool:
    """True when the compiled kernels can be used here (builds them on first call)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def unavailable_reason() -> str | None:
    """Why ``available()`` returned False (None if it returned True or was never asked)."""
    return _reason


def _comp_dtype(u: Tensor) -> torch.dtype:
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def _cvt(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.detach().to(dtype).contiguous()


def _back(g: Tensor | None, meta: tuple | None) -> Tensor | None:
    return None if (g is None or meta is None) else g.to(meta[0])


def _meta(*inputs: Tensor | None) -> tuple:
    """(dtype, rank) of each input (None for an absent one), to hand gradients back in the caller's dtypes
    and shapes."""
    return tuple(None if t is None else (t.dtype, t.dim()) for t in inputs)


def _needed(ctx, grads: tuple) -> tuple:
    """The scans' backward result: each input's gradient where autograd asks for it, None for the two
    non-tensor arguments (delta_softplus, chunk)."""
    grads = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[: len(grads)]))
    return (*grads, None, None)


def _scan(name: str, check, fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
          initial_state, chunk_len):
    """The scans' front-end: shape and device checks, the chunk length, the autograd Function ``fn``."""
    check(name, u, delta, A, B, C, D, z, delta_bias, initial_state)
    _check_cpu(name, u, delta, A, B, C, D, z, delta_bias, initial_state)
    chunk = int(chunk_len or DEFAULT_CHUNK)
    if chunk <= 0:
        raise ValueError(f"{name}: chunk_len must be positive, got {chunk_len}")
    out, last = fn.apply(u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), chunk)
    return (out, last) if return_last_state else out


def _real_scan_forward(ctx, layout: str, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
    """The real-A scans' autograd forward; layout "channel" (kernels fwd / bwd, a 3-D B / C lacks axis 1) or "time"
    (scan_tm_fwd / scan_tm_bwd, axis 2)."""
    ext, axis = load(), (1 if layout == "channel" else 2)
    comp = _comp_dtype(u)
    B4 = B if B.dim() == 4 else B.unsqueeze(axis)
    C4 = C if C.dim() == 4 else C.unsqueeze(axis)
    args = [_cvt(t, comp) for t in (u, delta, A, B4, C4, D, z, delta_bias)]
    fwd = ext.fwd if layout == "channel" else ext.scan_tm_fwd
    out, last, cst = fwd(*args, delta_softplus, _cvt(initial_state, comp), chunk)
    ctx.save_for_backward(*args, cst)
    ctx.delta_softplus, ctx.chunk, ctx.comp, ctx.layout = delta_softplus, chunk, comp, layout
    ctx.meta = _meta(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return out.to(u.dtype), last


def _real_scan_backward(ctx, dout, dlast):
    ext, axis = load(), (1 if ctx.layout == "channel" else 2)
    *args, cst = ctx.saved_tensors
    dout = torch.zeros_like(args[0]) if dout is None else dout.to(ctx.comp).contiguous()
    dlast = None if dlast is None else dlast.to(ctx.comp).contiguous()
    bwd = ext.bwd if ctx.layout == "channel" else ext.scan_tm_bwd
    du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = bwd(*args, ctx.delta_softplus, cst, dout, dlast, ctx.chunk)
    u, delta, A, B, C, D, z, bias, h0 = ctx.meta
    if B[1] == 3:
        dB = dB.squeeze(axis)
    if C[1] == 3:
        dC = dC.squeeze(axis)
    grads = (
        _back(du, u), _back(ddelta, delta), _back(dA, A), _back(dB, B), _back(dC, C),
        _back(dD, D), _back(dz, z), _back(dbias, bias), _back(dh0, h0),
    )
    return _needed(ctx, grads)


def _real_scan_function(layout: str, name: str) -> type[torch.autograd.Function]:
    """The autograd Function of one real-A scan layout (``name``: what profilers show)."""

    class _Scan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            return _real_scan_forward(ctx, layout, *args)

        @staticmethod
        def backward(ctx, dout, dlast):
            return _real_scan_backward(ctx, dout, dlast)

    _Scan.__name__ = _Scan.__qualname__ = name
    return _Scan


_SelectiveScanCPU = _real_scan_function("channel", "_SelectiveScanCPU")
_SelectiveScanTimeMajorCPU = _real_scan_function("time", "_SelectiveScanTimeMajorCPU")


def selective_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    chunk_len: int | None = None,
):
    """Compiled CPU twin of ``ssm_core.ops.selective_scan.selective_scan`` (same arguments, same results).

    Computes in fp32 (fp64 for fp64 ``u``); ``out`` comes back in u's dtype, ``last_state`` in the
    compute dtype. ``chunk_len`` is the spacing of the states saved for backward.
    Raises RuntimeError if the kernels can't be built here (check ``available()`` first).
    """
    return _scan("selective_scan_cpu", check_scan, _SelectiveScanCPU, u, delta, A, B, C, D, z, delta_bias,
                 delta_softplus, return_last_state, initial_state, chunk_len)


def selective_scan_time_major_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    chunk_len: int | None = None,
    layout: str | None = None,
):
    """Compiled CPU twin of ``ssm_core.ops.selective_scan.selective_scan_time_major``: u, delta, z (batch, L, dim),
    B, C (batch, L, [G,] N). Same dtypes and results as ``selective_scan_cpu`` on the transposed inputs.

    ``layout``: "time" runs kernels/csrc/scan_time_major_cpu.h (vectorized over channels), "channel" the
    channel-major kernel on transposed views; default: "time" where its 16-wide (AVX-512) build runs, else
    "channel" (its 8-wide build is no faster than the channel-major kernel: docs/kernels.md)."""
    if layout is None:
        layout = "time" if load().isa() == "avx512" else "channel"
    if layout not in ("time", "channel"):
        raise ValueError(f"selective_scan_time_major_cpu: layout must be 'time' or 'channel', got {layout!r}")
    if layout == "channel":
        check_scan_time_major("selective_scan_time_major_cpu", u, delta, A, B, C, D, z, delta_bias, initial_state)
        return run_channel_major(selective_scan_cpu, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                 return_last_state, initial_state, chunk_len=chunk_len)
    return _scan("selective_scan_time_major_cpu", check_scan_time_major, _SelectiveScanTimeMajorCPU, u, delta, A,
                 B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state, chunk_len)


def _pairs(X: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """complex (...) -> real (..., 2) of ``dtype`` (PyTorch's view_as_real), contiguous, detached."""
    if X is None:
        return None
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    return torch.view_as_real(X.detach().to(cdt).resolve_conj()).to(dtype).contiguous()


def _complex_back(g: Tensor | None, meta: tuple | None) -> Tensor | None:
    """real (..., 2) gradient -> complex in the input's dtype (and rank: an ungrouped B / C drops G)."""
    if g is None or meta is None:
        return None
    g = torch.view_as_complex(g.contiguous())
    if meta[1] == 3 and g.dim() == 4:
        g = g.squeeze(1)
    return g.to(meta[0])


class _ComplexScanCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
        ext = load()
        comp = _comp_dtype(u)
        B4 = B if B.dim() != 3 else B.unsqueeze(1)  # (batch, N, L) -> (batch, 1, N, L); (dim, N) stays
        C4 = C if C.dim() != 3 else C.unsqueeze(1)
        args = [_cvt(u, comp), _cvt(delta, comp), _pairs(A, comp), _pairs(B4, comp), _pairs(C4, comp),
                _cvt(D, comp), _cvt(z, comp), _cvt(delta_bias, comp)]
        out, last, cst = ext.complex_fwd(*args, delta_softplus, _pairs(initial_state, comp), chunk)
        ctx.save_for_backward(*args, cst)
        ctx.delta_softplus, ctx.chunk, ctx.comp = delta_softplus, chunk, comp
        ctx.meta = _meta(u, delta, A, B, C, D, z, delta_bias, initial_state)
        return out.to(u.dtype), torch.view_as_complex(last)

    @staticmethod
    def backward(ctx, dout, dlast):
        ext = load()
        *args, cst = ctx.saved_tensors
        comp = ctx.comp
        dout = torch.zeros_like(args[0]) if dout is None else dout.to(comp).contiguous()
        dlast = _pairs(dlast, comp)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = ext.complex_bwd(
            *args, ctx.delta_softplus, cst, dout, dlast, ctx.chunk
        )
        u, delta, A, B, C, D, z, bias, h0 = ctx.meta
        grads = (
            _back(du, u), _back(ddelta, delta), _complex_back(dA, A), _complex_back(dB, B), _complex_back(dC, C),
            _back(dD, D), _back(dz, z), _back(dbias, bias), _complex_back(dh0, h0),
        )
        return _needed(ctx, grads)


def complex_scan_cpu(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    chunk_len: int | None = None,
):
    """Compiled CPU twin of ``ssm_core.ops.complex_scan.complex_scan`` (same arguments, same results).

    A, B, C, initial_state complex (B / C time-invariant (dim, N) or (batch, [G,] N, L)); computes in fp32 /
    complex64 (fp64 / complex128 for fp64 ``u``); ``out`` in u's dtype, ``last_state`` complex. Differentiable
    in every input and through the last state; memory for backward: one state per ``chunk_len`` steps.
    """
    return _scan("complex_scan_cpu", check_complex_scan, _ComplexScanCPU, u, delta, A, B, C, D, z, delta_bias,
                 delta_softplus, return_last_state, initial_state, chunk_len)


def _check_cpu(name: str, *tensors: Tensor | None) -> None:
    if any(t is not None and t.device.type != "cpu" for t in tensors):
        raise ValueError(f"{name}: all tensors must be on the CPU")


class _CausalConv1dCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, silu):
        ext = load()
        comp = _comp_dtype(x)
        args = [_cvt(t, comp) for t in (x, weight, bias)]
        seq = None if seq_idx is None else seq_idx.detach().to(torch.int64).contiguous()
        init = _cvt(initial_states, comp)
        out, final = ext.conv_fwd(*args, seq, init, silu)
        ctx.save_for_backward(*args, seq, init)
        ctx.silu = silu
        ctx.meta = tuple(None if t is None else t.dtype for t in (x, weight, bias, initial_states))
        ctx.set_materialize_grads(False)
        return out.to(x.dtype), final.to(x.dtype)

    @staticmethod
    def backward(ctx, dout, dfinal):
        ext = load()
        x, weight, bias, seq, init = ctx.saved_tensors
        dout = torch.zeros_like(x) if dout is None else dout.to(x.dtype).contiguous()
        dfinal = None if dfinal is None else dfinal.to(x.dtype).contiguous()
        dx, dw, db, dinit = ext.conv_bwd(x, weight, bias, seq, init, ctx.silu, dout, dfinal)
        tx, tw, tb, ti = ctx.meta
        need = ctx.needs_input_grad
        return (
            dx.to(tx) if need[0] else None,
            dw.to(tw) if need[1] else None,
            db.to(tb) if tb is not None and need[2] else None,
            None,
            dinit.to(ti) if ti is not None and need[4] else None,
            None,
        )


def causal_conv1d_cpu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Compiled CPU twin of ``ssm_core.ops.conv.causal_conv1d`` (silu fused, seq_idx, carried state).

    Computes in fp32 (fp64 for fp64 x); out and final state come back in x's dtype. Differentiable in
    x, weight, bias and initial_states, and through the final state.
    """
    name = "causal_conv1d_cpu"
    check_conv(name, x, weight, bias, seq_idx, initial_states, activation)
    _check_cpu(name, x, weight, bias, seq_idx, initial_states)
    out, final = _CausalConv1dCPU.apply(x, weight, bias, seq_idx, initial_states, activation is not None)
    return (out, final) if return_final_states else out


class _CausalConv1dTimeMajorCPU(torch.autograd.Function):
    """Saves only the padded input xp (batch, L + W - 1, dim): backward recomputes the pre-activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, init, silu):
        comp = _comp_dtype(x)
        xp, final = pad_time_major(x, init, weight.shape[1], comp)
        wt, bc = _cvt(weight.t(), comp), _cvt(bias, comp)  # wt (W, dim): one tap's weights per row
        out = load().conv_tm_fwd(xp, wt, bc, silu)
        ctx.save_for_backward(xp, wt, bc)
        ctx.silu = silu
        ctx.meta = tuple(None if t is None else t.dtype for t in (x, weight, bias, init))
        ctx.set_materialize_grads(False)
        return out.to(x.dtype), final

    @staticmethod
    def backward(ctx, gout, gfinal):
        xp, wt, bc = ctx.saved_tensors
        W, d = wt.shape
        L = xp.shape[1] - (W - 1)
        if gout is None:
            dxp, sums = torch.zeros_like(xp), xp.new_zeros(W + 1, d)
        else:
            dxp, part = load().conv_tm_bwd(xp, wt, bc, ctx.silu, gout.to(xp.dtype).contiguous())
            sums = part.sum(0, dtype=torch.float64)  # the blocks' (dwt; dbias) partials, in a fixed order
        if gfinal is not None:
            dxp[:, L:] += gfinal.transpose(1, 2).to(xp.dtype)
        tx, tw, tb, ti = ctx.meta
        need = ctx.needs_input_grad
        return (dxp[:, W - 1:].to(tx) if need[0] else None,
                sums[:W].t().to(tw) if need[1] else None,
                sums[W].to(tb) if tb is not None and need[2] else None,
                dxp[:, : W - 1].transpose(1, 2).to(ti) if ti is not None and need[3] else None,
                None)


def causal_conv1d_time_major_cpu(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Compiled CPU twin of ``ssm_core.ops.conv.causal_conv1d_time_major``: x (batch, L, dim) with any strides
    -> (out (batch, L, dim), final state (batch, dim, W - 1)). Computes in fp32 (fp64 for fp64 x); differentiable
    in x, weight, bias and initial_states, and through the final state; keeps only the padded input for
    backward (the PyTorch path also keeps the output and its sigmoid)."""
    name = "causal_conv1d_time_major_cpu"
    if x.dim() != 3:
        raise ValueError(f"{name}: x must be (batch, L, dim), got shape {tuple(x.shape)}")
    check_conv(name, x.transpose(1, 2), weight, bias, None, initial_states, activation)
    _check_cpu(name, x, weight, bias, initial_states)
    return _CausalConv1dTimeMajorCPU.apply(x, weight, bias, initial_states, activation is not None)


class _RMSNormCPU(torch.autograd.Function):
    """Saves x, z (views when they can be: rows of any stride) and 1 / rms per row and group."""

    @staticmethod
    def forward(ctx, x, z, weight, eps, size):
        comp, C = _comp_dtype(x), x.shape[-1]
        xs = x.detach().to(comp).reshape(-1, C)
        zs = None if z is None else z.detach().to(comp).reshape(-1, C)
        w = _cvt(weight, comp)
        out, r = load().norm_fwd(xs, zs, w, eps, size)
        ctx.save_for_backward(xs, zs, w, r)
        ctx.cfg = (size, x.shape, tuple(None if t is None else t.dtype for t in (x, z, weight)))
        return out.view(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        xs, zs, w, r = ctx.saved_tensors
        size, shape, (tx, tz, tw) = ctx.cfg
        g = gout.to(xs.dtype).reshape(-1, xs.shape[1])
        dx, dz, part = load().norm_bwd(xs, zs, w, size, r, g)
        need = ctx.needs_input_grad
        return (dx.view(shape).to(tx) if need[0] else None,
                dz.view(shape).to(tz) if zs is not None and need[1] else None,
                part.sum(0, dtype=torch.float64).to(tw) if w is not None and need[2] else None,
                None, None)


def rms_norm_gated_cpu(x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float = 1e-5,
                       group_size: int | None = None) -> Tensor:
    """Compiled CPU twin of ``ssm_core.ops.norm.rms_norm_gated`` (gate before the norm: norm(x * silu(z)) * weight)
    and, with ``z=None``, of ``rms_norm``; over groups of ``group_size`` channels (default all). Computes in fp32
    (fp64 for fp64 x), returns x's dtype; differentiable in x, z and weight; keeps x, z and one 1 / rms per row
    and group for backward."""
    name = "rms_norm_gated_cpu"
    C = x.shape[-1]
    size = C if group_size is None else int(group_size)
    if size < 1 or C % size:
        raise ValueError(f"{name}: group_size {size} does not divide {C} channels")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{name}: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if weight is not None and tuple(weight.shape) != (C,):
        raise ValueError(f"{name}: weight must be ({C},), got {tuple(weight.shape)}")
    _check_cpu(name, x, z, weight)
    return _RMSNormCPU.apply(x, z, weight, float(eps), size)


def causal_conv1d_update_cpu(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """One decode step, in place, like ``causal_conv1d_update(inplace=True)``: returns out (batch, dim)."""
    name = "causal_conv1d_update_cpu"
    check_conv_update(name, x, conv_state, weight, bias, activation)
    _check_cpu(name, x, conv_state, weight, bias)
    comp = _comp_dtype(x)
    direct = conv_state.dtype == comp and conv_state.is_contiguous()
    st = conv_state if direct else conv_state.to(comp).contiguous()
    out = load().conv_update(_cvt(x, comp), st, _cvt(weight, comp), _cvt(bias, comp), activation is not None)
    if not direct:  # the kernel needs a contiguous compute-dtype state: update a copy, write it back
        conv_state.copy_(st)
    return out.to(x.dtype)


def selective_state_update_cpu(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """Advance ``state`` in place by one token (or T tokens); returns out in x's dtype.

    Layouts and semantics of ssm_core's ``selective_state_update`` with ``inplace=True`` (Mamba-1:
    state (batch, dim, N); Mamba-2: state (batch, nheads, headdim, N); B/C grouped). Not differentiable.
    """
    name = "selective_state_update_cpu"
    several = check_state_update(name, state, x, dt, A, B, C, D, z, dt_bias)
    _check_cpu(name, state, x, dt, A, B, C, D, z, dt_bias)
    ext, comp = load(), _comp_dtype(x)
    # Per-call overhead dominates a decode step: no views, no copies unless a dtype or layout needs one
    # (stride-0 broadcasts such as Mamba-2's expanded A / dt are read in place by the kernel).
    direct = state.dtype == comp and state.stride(-1) == 1
    st = state if direct else state.to(comp).contiguous()

    def c(t):
        return t if t is None or t.dtype == comp else t.to(comp)

    A_, D_, bias_ = c(A), c(D), c(dt_bias)

    def step(xt, dtt, Bt, Ct, zt):
        return ext.state_update(st, c(xt), c(dtt), A_, c(Bt), c(Ct), D_, c(zt), bias_, bool(dt_softplus))

    with torch.no_grad():
        out = per_token(several, step, x, dt, B, C, z)
        if not direct:
            state.copy_(st)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def mamba_chunk_scan_combined_cpu(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
):
    """Mamba-2 SSD on CPU through the compiled selective scan; ``mamba_chunk_scan_combined``'s semantics.

    SSD is the selective scan with A constant per head and B/C shared per group, so it runs as the
    Mamba-1 kernel on d_inner = nheads x headdim channels. Measured on this project's 2-core CPU
    (docs/kernels.md) this beats the chunked matmul form at N = 16 by 4-6x and matches or beats it at
    N = 128, forward and backward. Δ = clamp(softplus(dt + dt_bias)) is computed in PyTorch first (so
    autograd carries dt_limit's clamp), then passed as the scan's delta. ``chunk_size`` does not change
    the result here. ``seq_idx`` is not supported (``supports_seq_idx`` is False: ssm_core keeps its
    own path for packed sequences).
    """
    name = "mamba_chunk_scan_combined_cpu"
    check_ssd(name, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    _check_cpu(name, x, dt, A, B, C, D, z, dt_bias, initial_states)
    if seq_idx is not None:
        raise ValueError(f"{name}: seq_idx (packed sequences) is not supported by the CPU scan kernel")
    b, L, H, P = x.shape
    N = B.shape[3]
    acc = _comp_dtype(x)
    delta = dt.to(acc)
    if dt_bias is not None:
        delta = delta + dt_bias.to(acc)
    if dt_softplus:
        delta = torch.nn.functional.softplus(delta)
    if tuple(dt_limit) != (0.0, math.inf):
        delta = delta.clamp(min=dt_limit[0], max=dt_limit[1])

    def channels(t):  # (b, L, H, P) -> (b, H*P, L)
        return t.reshape(b, L, H * P).transpose(1, 2)

    u = channels(x)
    delta = delta.unsqueeze(-1).expand(b, L, H, P).reshape(b, L, H * P).transpose(1, 2)
    A1 = A.to(acc)[:, None, None].expand(H, P, N).reshape(H * P, N)
    D1 = None if D is None else (D.to(acc)[:, None].expand(H, P) if D.dim() == 1 else D.to(acc)).reshape(H * P)
    h0 = None if initial_states is None else initial_states.reshape(b, H * P, N)
    y, last = selective_scan_cpu(u, delta, A1, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D1,
                                 None if z is None else channels(z), None, False, True, h0)
    y = y.transpose(1, 2).reshape(b, L, H, P)
    return (y, last.reshape(b, H, P, N)) if return_final_states else y


mamba_chunk_scan_combined_cpu.supports_seq_idx = False


def decode_model_cpu(batch: int):
    """A new, empty compiled whole-model decode step (``csrc/model_step_cpu.h``) for ``batch`` rows.

    Plain tensors in, no ssm_core (the binder is ``ssm_core.models.fast_decode.FastDecoder``)::

        dm = decode_model_cpu(batch)
        dm.set_io({"embedding": E, "lm_head": W, "norm_f_weight": w}, {"norm_f_eps": 1e-5, "residual_in_fp32": 1})
        dm.add_layer("mamba1" | "mamba2" | "external", tensors, numbers)   # in layer order
        dm.bind_state(i, conv_state, ssm_state)                             # updated in place by every call
        logits = dm.forward(tokens (batch, T), n_last, snapshots)           # (batch, n_last, padded vocab)
        dm.restore(t)                                                       # the state after token t (snapshots)

    or, with external (attention) layers run by the caller in between: ``embed(tokens)``, ``run_layers(a, b,
    snapshots)``, ``residual()`` (a (batch, T, d_model) fp32 view to read and write), ``head(n_last)``.
    Matrices (in_proj, x_proj, dt_proj, out_proj, fc1, fc2, embedding, lm_head) are used in place: contiguous
    fp32 or bf16, one dtype for all; per-channel parameters are contiguous fp32. Any matrix may instead be int8
    weight-only: an int8 (O, K) tensor plus ``"<name>_scale"``, fp32 (O,) per-row scales (W = q * scale; a tied
    head passes the same int8 tensor as embedding and lm_head, and ``numbers["bf16"]`` then gives the model
    dtype). The returned logits are an internal buffer, overwritten by the next call. Not differentiable. Raises
    RuntimeError when the extension cannot be built here (see ``available()``).
    """
    return load().DecodeModel(int(batch))
