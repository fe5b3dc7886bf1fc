"""Helpers shared by the Triton kernels: math device functions and launch utilities."""

from __future__ import annotations

import os

import numpy as np
import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "").strip() not in ("", "0")


def _fix_interpreter_index() -> None:
    """Work around triton-lang/triton#9171 (Triton 3.6 interpreter + NumPy >= 2.4).

    The interpreter turns runtime scalars into 1-element arrays and implements ``tensor.__index__``
    as ``int(array)``, which NumPy 2.4 rejects, so ``range(0, n)`` over a runtime ``n`` fails inside an
    interpreted kernel. This wraps the interpreter's patch hook with the upstream fix (take the single
    element). Only touches the interpreter, only when TRITON_INTERPRET is set; a no-op if the hook is
    missing (a fixed or restructured Triton).
    """
    try:
        from triton.runtime import interpreter as ti
    except Exception:  # pragma: no cover - no interpreter in this triton
        return
    orig = getattr(ti, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_hiss_index_fix", False):
        return

    def patched(tensor, scope, _orig=orig):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._hiss_index_fix = True
    ti._patch_lang_tensor = patched


if INTERPRET:
    _fix_interpreter_index()


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """State / accumulation dtype: fp64 for fp64 inputs, else fp32 (matches ssm_core)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def tl_acc(x: torch.Tensor):
    """The Triton accumulation dtype (a constexpr argument of every kernel)."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def check_device(*tensors: torch.Tensor | None, name: str) -> None:
    """Kernels need CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""
    for t in tensors:
        if t is None:
            continue
        if INTERPRET:
            if t.device.type != "cpu":
                raise ValueError(f"{name}: TRITON_INTERPRET=1 needs CPU tensors, got {t.device}")
        elif t.device.type != "cuda":
            raise ValueError(
                f"{name}: Triton kernels need CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 before "
                f"importing triton to run them on the CPU"
            )


def dummy(like: torch.Tensor) -> torch.Tensor:
    """Placeholder pointer for an absent optional tensor (never dereferenced)."""
    return like.new_empty(1)


# Interpreter cost: every nested @triton.jit call re-patches triton.language (milliseconds each), so
# the kernels inline their math (softplus, silu, ...) instead of calling jit helpers, and reduce with
# tl.reduce(x, axis, sum_combine) rather than tl.sum (itself a jit function). On the GPU this is the
# same code as tl.sum for floating-point inputs.
from triton.language.standard import _sum_combine as sum_combine  # noqa: E402, F401
