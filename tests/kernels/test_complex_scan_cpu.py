"""The compiled complex scan (kernels/csrc/complex_scan_cpu.h via kernels.cpu.complex_scan_cpu).

Checked against the naive fp64 real-arithmetic recurrence of tests/core/test_complex_scan.py (outputs and the
gradient of every input, fp64 kernel), against ssm_core's PyTorch path in fp32, across chunk sizes, state
sizes that fill 1-5 SIMD vectors (with padding), both instruction sets, and the LTI shortcut (a decay reused
while Δ does not change). Skips when the kernels can't be built here.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

try:
    import kernels.cpu as kcpu
except ImportError:  # running pytest without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import kernels.cpu as kcpu

from ssm_core.ops.complex_scan import complex_scan, complex_scan_ref

_spec = importlib.util.spec_from_file_location(
    "_complex_scan_core_tests", Path(__file__).resolve().parents[1] / "core" / "test_complex_scan.py")
_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_core)
make, run_naive_with_grads, run_op_with_grads, assert_all_close = (
    _core.make, _core.run_naive_with_grads, _core.run_op_with_grads, _core.assert_all_close)

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads_io(pairs, seed=1):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(pairs["u"].shape, generator=g, dtype=torch.float64)
    dlast = torch.randn(*pairs["u"].shape[:2], pairs["A"].shape[1], 2, generator=g, dtype=torch.float64)
    return dy, dlast


@pytest.mark.parametrize("case", _core.CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_kernel_fp64_matches_the_naive_recurrence_with_every_gradient(ext, case):
    pairs, ops = make(**case)
    softplus = case.get("softplus", True)
    dy, dlast = _grads_io(pairs)
    want = run_naive_with_grads(pairs, softplus, dy, dlast)
    for isa in (["base", "avx2"] if ext.isa() != "base" else ["base"]):
        ext.set_isa(isa)
        got = run_op_with_grads(kcpu.complex_scan_cpu, ops, softplus, dy, dlast, chunk_len=4)
        assert_all_close(got, want, atol=1e-10, rtol=1e-9, what=f"kernel {isa}")
    ext.set_isa("auto")


@pytest.mark.parametrize("N", [3, 8, 13, 40], ids=lambda n: f"N{n}")
@pytest.mark.parametrize("bc", ["invariant", "ungrouped", "grouped"])
def test_kernel_fp32_equals_the_pytorch_path(ext, N, bc):
    """N = 40 fills 5 fp32 vectors: a 4-vector block then a 1-vector block; 3 and 13 leave padded lanes."""
    pairs, ops = make(b=2, d=4, L=70, N=N, bc=bc, dtype=torch.float32, seed=N)
    dy, dlast = _grads_io(pairs)
    want = run_op_with_grads(complex_scan, ops, True, dy, dlast, backend="ref")
    for isa in (["base", "avx2"] if ext.isa() != "base" else ["base"]):
        ext.set_isa(isa)
        got = run_op_with_grads(kcpu.complex_scan_cpu, ops, True, dy, dlast)  # 64-step chunks: 2 chunks
        # fp32 rounding relative to each tensor's scale: with A_imag up to π·39 the dΔ terms reach ~1e3 and
        # both paths sit ~1e-5 of that away from the fp64 truth (measured), so compare at 1e-4 of the scale
        for name, g, w in [("y", got[0], want[0]), ("last", got[1], want[1])] + [
                (k, got[2][k], want[2][k]) for k in want[2]]:
            torch.testing.assert_close(g, w, atol=1e-4 * float(w.abs().max()), rtol=0,
                                       msg=lambda m, name=name, isa=isa: f"fp32 {isa} {name}: {m}")
    ext.set_isa("auto")


def test_dispatch_picks_the_kernel_and_chunk_size_does_not_change_results(ext):
    _, ops = make(L=29, bc="ungrouped")
    y, h = complex_scan(**ops, delta_softplus=True, return_last_state=True)  # auto: the kernel
    for chunk in (1, 5, 29, 64):
        y2, h2 = kcpu.complex_scan_cpu(**ops, delta_softplus=True, return_last_state=True, chunk_len=chunk)
        torch.testing.assert_close(y2, y, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(h2, h, atol=1e-12, rtol=1e-12)


def test_kernel_pieces_with_the_state_carried_equal_one_shot(ext):
    _, ops = make(L=20, bc="grouped", h0=False, dtype=torch.float32)
    y, last = kcpu.complex_scan_cpu(**ops, delta_softplus=True, return_last_state=True)
    cut = {k: (v[..., :7], v[..., 7:]) if k in ("u", "delta", "z", "B", "C") else (v, v) for k, v in ops.items()}
    y1, h1 = kcpu.complex_scan_cpu(**{k: v[0] for k, v in cut.items()}, delta_softplus=True, return_last_state=True)
    y2, h2 = kcpu.complex_scan_cpu(**{**{k: v[1] for k, v in cut.items()}, "initial_state": h1},
                                   delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, last, atol=1e-5, rtol=1e-5)


def test_constant_delta_reuses_the_decay_with_identical_results(ext):
    """The LTI layer's Δ is the same at every step: the kernel skips recomputing exp / sincos then."""
    _, ops = make(L=40, bc="invariant", dtype=torch.float32)
    ops["delta"] = ops["delta"][..., :1].expand_as(ops["delta"]).contiguous()
    y = kcpu.complex_scan_cpu(**ops, delta_softplus=True)
    torch.testing.assert_close(y.double(), complex_scan_ref(**{k: (v.double() if v.dtype == torch.float32 else
                                                                   v.to(torch.complex128)) if v is not None else None
                                                               for k, v in ops.items()}, delta_softplus=True),
                               atol=1e-4, rtol=1e-4)


def test_vector_sincos_accuracy(ext):
    x = torch.cat([torch.linspace(-30, 30, 20001), torch.linspace(-2000, 2000, 20001)])
    s, c = ext.complex_sincos(x)
    xd = x.double()
    assert (s.double() - torch.sin(xd)).abs().max() < 3e-7 * max(1.0, math.log2(2000) / 4)
    assert (c.double() - torch.cos(xd)).abs().max() < 3e-7 * max(1.0, math.log2(2000) / 4)
