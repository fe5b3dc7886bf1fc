"""The time-major selective scan (kernels/csrc/scan_time_major_cpu.h, ``selective_scan_time_major``): fp64 against
the naive recurrence with every gradient (fp64 runs the 4-wide build under every instruction set), fp32 in every
build this CPU runs (8-wide base / avx2, 16-wide avx512) against the channel-major kernel on the transposed inputs
and the op's PyTorch path, chunked == one-shot, two threads == one (a group's channels split between tasks);
channel counts that are not a multiple of the vector width (padded per group) included. ``layout="time"`` forces
this kernel (by default CPUs without AVX-512 take the channel-major kernel on transposed views, also tested)."""

from __future__ import annotations

import pytest
import torch

import kernels.cpu as kcpu
from ssm_core.ops import selective_scan_time_major, selective_scan_time_major_ref

pytestmark = pytest.mark.usefixtures("one_thread")


def _builds(ext) -> list[str]:
    """Every build of this kernel the CPU can run."""
    out = ["base"]
    for name in ("avx2", "avx512"):
        try:
            ext.set_isa(name)
        except RuntimeError:
            continue
        out.append(name)
    ext.set_isa("auto")
    return out


def make(b, L, d, N, G, dtype, *, z=True, D=True, bias=True, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype).requires_grad_()

    bc = (b, L, N) if G == 0 else (b, L, G, N)
    return dict(
        u=r(b, L, d), delta=r(b, L, d, scale=0.5, shift=-1.0),
        A=(-(torch.rand(d, N, generator=g, dtype=torch.float64) * 3 + 0.2)).to(dtype).requires_grad_(),
        B=r(*bc), C=r(*bc), D=r(d) if D else None, z=r(b, L, d) if z else None, delta_bias=r(d, scale=0.3) if bias
        else None, initial_state=r(b, d, N) if h0 else None,
    )


def run(fn, x, **kw):
    """(out, last_state) and the gradient of a fixed random loss on both w.r.t. every input."""
    out, last = fn(**x, delta_softplus=True, return_last_state=True, **kw)
    g = torch.Generator().manual_seed(123)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    wl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    inputs = {k: v for k, v in x.items() if v is not None}
    grads = torch.autograd.grad((out * wo).sum() + (last * wl).sum(), list(inputs.values()))
    return out, last, dict(zip(inputs, grads))


CASES = [  # (batch, L, dim, N, G, options)
    dict(b=2, L=17, d=32, N=16, G=2),                     # Vim's shape: two groups (directions), N 16
    dict(b=2, L=40, d=24, N=5, G=3, z=False),             # 8 channels a group: padded to 16 in the wide build
    dict(b=3, L=9, d=10, N=16, G=2, D=False, bias=False, h0=False),  # 5 a group: padded in every build
    dict(b=1, L=70, d=16, N=3, G=0),                      # ungrouped (batch, L, N) B / C
    dict(b=2, L=21, d=32, N=20, G=1),                     # N > 16: the general-N loops, lane sums with a tail
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_time_major_kernel_fp64_matches_the_naive_recurrence_with_every_gradient(ext, case):
    x = make(**case, dtype=torch.float64)
    want = run(selective_scan_time_major_ref, x)
    for build in _builds(ext):
        ext.set_isa(build)
        # several chunks: the state saved and recomputed
        got = run(kcpu.selective_scan_time_major_cpu, x, chunk_len=8, layout="time")
        torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-9, msg=lambda m, b=build: f"{b} out: {m}")
        torch.testing.assert_close(got[1], want[1], atol=1e-10, rtol=1e-9, msg=lambda m, b=build: f"{b} last: {m}")
        for k in want[2]:
            torch.testing.assert_close(got[2][k], want[2][k], atol=1e-10, rtol=1e-9,
                                       msg=lambda m, k=k, b=build: f"{b} d{k}: {m}")
    ext.set_isa("auto")


@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_time_major_kernel_fp32_equals_the_channel_major_kernel(ext, case):
    x = make(**case, dtype=torch.float32, seed=1)
    want = run(selective_scan_time_major, x, backend="ref")  # the op's PyTorch path (fp32, chunked)

    def channel_major(u, delta, A, B, C, D, z, delta_bias, initial_state, **kw):
        bc = (lambda X: X.transpose(1, 2)) if B.dim() == 3 else (lambda X: X.permute(0, 2, 3, 1))
        out, last = kcpu.selective_scan_cpu(u.transpose(1, 2), delta.transpose(1, 2), A, bc(B), bc(C), D,
                                            None if z is None else z.transpose(1, 2), delta_bias,
                                            initial_state=initial_state, **kw)
        return out.transpose(1, 2), last

    cm = run(channel_major, x)
    for build in _builds(ext):
        ext.set_isa(build)
        got = run(kcpu.selective_scan_time_major_cpu, x, layout="time")
        for what, ref in (("PyTorch path", want), ("channel-major kernel", cm)):
            for i in (0, 1):  # out, last state
                torch.testing.assert_close(got[i], ref[i], atol=2e-5, rtol=1e-4,
                                           msg=lambda m, b=build, w=what: f"{b} vs {w}: {m}")
            for k in ref[2]:
                scale = float(ref[2][k].abs().max())
                torch.testing.assert_close(got[2][k], ref[2][k], atol=2e-5 * max(scale, 1.0), rtol=1e-4,
                                           msg=lambda m, k=k, b=build, w=what: f"{b} vs {w} d{k}: {m}")
    ext.set_isa("auto")


def test_time_major_kernel_chunked_equals_one_shot(ext):
    x = make(b=2, L=50, d=16, N=16, G=2, dtype=torch.float32, seed=2)
    for build in _builds(ext):
        ext.set_isa(build)
        one = run(kcpu.selective_scan_time_major_cpu, x, chunk_len=64, layout="time")
        for chunk in (1, 7, 25):
            got = run(kcpu.selective_scan_time_major_cpu, x, chunk_len=chunk, layout="time")
            torch.testing.assert_close(got[0], one[0], atol=1e-6, rtol=1e-5)
            for k in one[2]:
                torch.testing.assert_close(got[2][k], one[2][k], atol=1e-5, rtol=1e-5,
                                           msg=lambda m, k=k, b=build: f"{b} d{k}: {m}")
    ext.set_isa("auto")


def test_time_major_scan_names_the_bad_layout():
    x = make(b=2, L=9, d=8, N=4, G=2, dtype=torch.float32)
    x["B"] = x["B"].detach().permute(0, 2, 3, 1)  # channel-major (batch, G, N, L) handed to the time-major op
    with pytest.raises(ValueError, match=r"B must be \(batch, L, N\) or \(batch, L, G, N\)"):
        selective_scan_time_major(**x)


def test_time_major_kernel_two_threads_equal_one(ext):
    """Two tasks split a group's channels (the middle one of three): each task keeps a private dB / dC part for
    it, added in task order, and writes the groups it owns directly."""
    x = make(b=2, L=30, d=72, N=16, G=3, dtype=torch.float32, seed=3)  # 24 channels a group
    for build in _builds(ext):
        ext.set_isa(build)
        one = run(kcpu.selective_scan_time_major_cpu, x, chunk_len=8, layout="time")
        torch.set_num_threads(2)
        try:
            two = run(kcpu.selective_scan_time_major_cpu, x, chunk_len=8, layout="time")
        finally:
            torch.set_num_threads(1)
        torch.testing.assert_close(two[0], one[0], atol=0, rtol=0)
        for k in one[2]:
            torch.testing.assert_close(two[2][k], one[2][k], atol=1e-6, rtol=1e-6,
                                       msg=lambda m, k=k, b=build: f"{b} d{k}: {m}")
    ext.set_isa("auto")


def test_time_major_kernel_refuses_chunk_states_of_another_width(ext):
    """Forward under one instruction set, backward under another: a clear error, not a wrong gradient."""
    if "avx512" not in _builds(ext):
        pytest.skip("needs AVX-512 (the 16-wide build)")
    x = make(b=1, L=9, d=24, N=16, G=1, dtype=torch.float32, h0=False)
    args = [x[k].detach() for k in ("u", "delta", "A", "B", "C")]
    ext.set_isa("avx512")
    out, _, cst = ext.scan_tm_fwd(*args, None, None, None, True, None, 64)  # 24 channels padded to 32
    ext.set_isa("avx2")
    try:
        with pytest.raises(RuntimeError, match="keep the instruction set"):
            ext.scan_tm_bwd(*args, None, None, None, True, cst, torch.ones_like(out), None, 64)
    finally:
        ext.set_isa("auto")


def test_channel_layout_fallback_equals_the_time_major_kernel(ext):
    """What CPUs without AVX-512 run by default: the channel-major kernel on transposed views, same results."""
    x = make(b=2, L=17, d=32, N=16, G=2, dtype=torch.float64, seed=4)
    want = run(kcpu.selective_scan_time_major_cpu, x, layout="time")
    got = run(kcpu.selective_scan_time_major_cpu, x, layout="channel")
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(got[1], want[1], atol=1e-12, rtol=1e-10)
    for k in want[2]:
        torch.testing.assert_close(got[2][k], want[2][k], atol=1e-11, rtol=1e-10, msg=lambda m, k=k: f"d{k}: {m}")
    with pytest.raises(ValueError, match="layout must be"):
        kcpu.selective_scan_time_major_cpu(**{k: v for k, v in x.items()}, layout="rows")
