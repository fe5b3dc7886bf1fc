"""The one place that picks an op's implementation.

backend="auto" (default) uses the compiled CPU kernel for CPU tensors and the Triton kernels for
CUDA tensors; "ref" forces the pure-PyTorch path in ssm_core; "cpu" / "triton" ask for a fast path
explicitly. The environment variable HISS_BACKEND overrides the default for a whole process. When
a fast path can't load (no compiler, no triton, ...), ops fall back to the PyTorch path after one
warning line that says why.

Dependency rule, as it is: ssm_core imports ``kernels.shape_checks`` at import time (pure Python, imports
only torch: the shape rules shared by every path); the compiled CPU and Triton kernels are imported lazily,
only here, on an op's first fast-path call. ``KERNELS`` below names each op's kernel per backend, so a
reader can jump from an op to its kernel. ``kernels`` never imports ssm_core.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable

import torch

__all__ = ["BACKENDS", "ENV_VAR", "KERNELS", "SSD_CPU_ENV", "resolve_backend", "fast_path", "load_kernel",
           "ssd_cpu_impl"]

BACKENDS = ("auto", "ref", "cpu", "triton")
ENV_VAR = "HISS_BACKEND"
_warned: set[str] = set()

# op (the name an ssm_core op passes to fast_path) -> backend -> "module:function" of its kernel.
# Strings, not functions: nothing here is imported until an op first takes the fast path.
KERNELS: dict[str, dict[str, str]] = {
    "selective_scan": {
        "cpu": "kernels.cpu:selective_scan_cpu",
        "triton": "kernels.triton:selective_scan_triton",
    },
    # time-major (batch, L, dim), vectorized over channels (Vim); no Triton kernel: CUDA transposes to selective_scan
    "selective_scan_time_major": {
        "cpu": "kernels.cpu:selective_scan_time_major_cpu",
    },
    # complex diagonal A (S4D / complex Mamba); no Triton kernel: CUDA tensors take the PyTorch path
    "complex_scan": {
        "cpu": "kernels.cpu:complex_scan_cpu",
    },
    "selective_state_update": {
        "cpu": "kernels.cpu:selective_state_update_cpu",
        "triton": "kernels.triton:selective_state_update_triton",
    },
    "mamba_chunk_scan_combined": {
        "cpu": "kernels.cpu:mamba_chunk_scan_combined_cpu",
        "triton": "kernels.triton:mamba_chunk_scan_combined_triton",
    },
    "causal_conv1d": {
        "cpu": "kernels.cpu:causal_conv1d_cpu",
        "triton": "kernels.triton:causal_conv1d_triton",
    },
    # time-major (batch, L, dim), Mamba-2's layout; no Triton kernel: CUDA takes the PyTorch ops of ops/conv.py
    "causal_conv1d_time_major": {
        "cpu": "kernels.cpu:causal_conv1d_time_major_cpu",
    },
    # (gated) RMSNorm; no Triton kernel: CUDA takes the PyTorch code of ops/norm.py
    "rms_norm_gated": {
        "cpu": "kernels.cpu:rms_norm_gated_cpu",
    },
    "causal_conv1d_update": {
        "cpu": "kernels.cpu:causal_conv1d_update_cpu",
        "triton": "kernels.triton:causal_conv1d_update_triton",
    },
    # the whole-model decode step (every layer of an LM in one call); CPU only, used by
    # ssm_core.models.fast_decode.FastDecoder (generate / stream / speculative decoding)
    "model_step": {
        "cpu": "kernels.cpu:decode_model_cpu",
    },
}


# Mamba-2 SSD on CPU has two fast implementations; ``ssd_cpu_impl`` picks one per call (docs/kernels.md):
#   "matmul": ssm_core.ops.ssd.ssd_matmul, the chunked SSD through BLAS with a hand-written backward (PyTorch
#             only: it needs no compiler);
#   "scan":   KERNELS["mamba_chunk_scan_combined"]["cpu"], the compiled Mamba-1 scan on the expanded inputs.
# $HISS_SSD_CPU = auto (default) | matmul | scan forces one (benchmarks compare them side by side).
SSD_CPU_ENV = "HISS_SSD_CPU"
# Measured (one thread, CPU time, 24 heads x 64; docs/benchmarks.md "Mamba-2 SSD on CPU"): the matmul form's
# forward + backward is faster from d_state 64 at every L (2.5-4.5x at 128) and at d_state 16 from L 4096
# (1.8x; the expanded-input scan's cost per token grows with L), the scan's at d_state 16, L <= 1024
# (1.4x). Forward alone: the matmul form from d_state 64 (1.7-3.4x); at 16 it is on par at L 1024.
SSD_MATMUL_MIN_DSTATE = 32
SSD_MATMUL_MIN_LEN_SMALL_STATE = 2048


def ssd_cpu_impl(dstate: int, length: int, training: bool) -> str:
    """"matmul" or "scan": the faster Mamba-2 SSD on CPU for this d_state and length ($HISS_SSD_CPU overrides)."""
    name = os.environ.get(SSD_CPU_ENV) or "auto"
    if name not in ("auto", "matmul", "scan"):
        raise ValueError(f"{SSD_CPU_ENV} must be auto, matmul or scan, got {name!r}")
    if name != "auto":
        return name
    del training  # measured: the same rule forward-only and with backward
    return "matmul" if (dstate >= SSD_MATMUL_MIN_DSTATE or length >= SSD_MATMUL_MIN_LEN_SMALL_STATE) else "scan"


def _probe(name: str) -> tuple[bool, str]:
    """Whether kernels.<name> loads here, and if not, why."""
    try:
        mod = importlib.import_module(f"kernels.{name}")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"import kernels.{name} failed: {exc}"
    if mod.available():
        return True, ""
    reason = getattr(mod, "unavailable_reason", lambda: None)() or "not available on this machine"
    return False, reason


def _fallback(name: str, reason: str) -> str:
    if name not in _warned:
        _warned.add(name)
        first_line = reason.strip().splitlines()[0] if reason.strip() else reason
        warnings.warn(f"hiss: {name} kernels unavailable ({first_line}); using the PyTorch reference path",
                      RuntimeWarning, stacklevel=3)
    return "ref"


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Resolve ``backend`` (None -> $HISS_BACKEND or "auto") to "ref", "cpu" or "triton" for ``device``."""
    name = backend or os.environ.get(ENV_VAR) or "auto"
    if name not in BACKENDS:
        source = "backend" if backend else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        name = {"cpu": "cpu", "cuda": "triton"}.get(device.type, "ref")
    if name == "ref":
        return name
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend='cpu' needs CPU tensors, got {device}")
    if name == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    ok, reason = _probe(name)
    return name if ok else _fallback(name, reason)


def load_kernel(op: str, backend: str) -> Callable | None:
    """Import and return ``KERNELS[op][backend]``, or None when that backend has no kernel for the op."""
    target = KERNELS[op].get(backend)
    if target is None:
        return None
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def fast_path(backend: str | None, device: torch.device, op: str) -> Callable | None:
    """The kernel ``KERNELS[op][b]`` for the backend b chosen for ``device`` (imported on first use), or None
    for the PyTorch path ("ref", a fast path that cannot load here, or a backend with no kernel for the op)."""
    if op not in KERNELS:  # checked on every path, so a misnamed op fails under HISS_BACKEND=ref too
        raise KeyError(f"fast_path: no op {op!r} in ssm_core.ops.backend.KERNELS; known: {sorted(KERNELS)}")
    name = resolve_backend(backend, device)
    if name == "ref":
        return None
    return load_kernel(op, name)
