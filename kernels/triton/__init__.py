"""hiss.kernels.triton: Triton GPU kernels for the Mamba ops (see docs/kernels_triton.md).

* ``selective_scan_triton``: Mamba-1 selective scan, forward + backward (Triton).
* ``mamba_chunk_scan_combined_triton``: Mamba-2 chunked SSD, forward + backward (Triton).
* ``causal_conv1d_triton`` (forward + backward), ``causal_conv1d_update_triton`` (decode step).
* ``selective_state_update_triton``: decode-step state update, Mamba-1 and Mamba-2 layouts, in place.

Each has the semantics of its ``ssm_core.ops`` twin. The kernels run on CUDA tensors, or on CPU
tensors through Triton's interpreter when ``TRITON_INTERPRET=1`` is set *before* triton (and this
package's kernel modules) are imported. Importing this package imports neither triton nor a kernel
module; ``available()`` says whether the kernels can run here.
"""

from __future__ import annotations

import importlib
import os

__all__ = [
    "available",
    "selective_scan_triton",
    "mamba_chunk_scan_combined_triton",
    "causal_conv1d_triton",
    "causal_conv1d_update_triton",
    "selective_state_update_triton",
]

_WHERE = {
    "selective_scan_triton": "selective_scan",
    "mamba_chunk_scan_combined_triton": "ssd",
    "causal_conv1d_triton": "conv",
    "causal_conv1d_update_triton": "conv",
    "selective_state_update_triton": "state_update",
}


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def available() -> bool:
    """True when triton imports and either a CUDA device is usable or TRITON_INTERPRET=1 is set."""
    try:
        import torch
        import triton  # noqa: F401
    except Exception:
        return False
    if _interpret():
        return True
    try:
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
