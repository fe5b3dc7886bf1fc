"""The one place that picks an op's implementation.

backend="auto" (default) uses the compiled CPU kernel for CPU tensors and the Triton kernels for
CUDA tensors; "ref" forces the pure-PyTorch path in ssm_core; "cpu" / "triton" ask for a fast path
explicitly. The environment variable HISS_BACKEND overrides the default for a whole process. When
a fast path can't load (no compiler, no triton, ...), ops fall back to the PyTorch path after one
warning line that says why. ``kernels`` is imported lazily, only here.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "fast_path"]

BACKENDS = ("auto", "ref", "cpu", "triton")
ENV_VAR = "HISS_BACKEND"
_warned: set[str] = set()


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


def fast_path(backend: str | None, device: torch.device, op: str):
    """The kernel ``kernels.<backend>.<op>_<backend>`` chosen for ``device``, or None for the PyTorch path."""
    name = resolve_backend(backend, device)
    if name == "ref":
        return None
    fn = getattr(importlib.import_module(f"kernels.{name}"), f"{op}_{name}", None)
    if fn is None:  # this backend has no kernel for the op: the PyTorch path is the implementation
        return None
    return fn
