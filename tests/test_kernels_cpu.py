"""The compiled CPU selective scan (kernels.cpu) against the reference recurrence.

The first test to need the kernel builds it (about 1.5 min with 2 cores on a cold cache; cached
afterwards under ~/.cache/hiss/kernels or $HISS_KERNEL_CACHE). Everything skips, with the reason,
when the kernel can't be built here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import kernels.cpu as kcpu
except ImportError:  # running pytest without the repo root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kernels.cpu as kcpu

from ssm_core.ops.selective_scan import selective_scan_ref


@pytest.fixture(scope="module")
def ext():
    if not kcpu.available():
        pytest.skip(f"CPU kernels unavailable: {kcpu.unavailable_reason()}")
    mod = kcpu.load()
    yield mod
    mod.set_isa("auto")


def _isas(ext):
    return ["base", "avx2"] if ext.isa() == "avx2" else ["base"]


def make(b, d, L, N, G, dtype, *, D=True, z=True, bias=True, h0=True, softplus=True, seed=0):
    """Inputs as a Mamba layer passes them; G=0 means the 3D (batch, N, L) B/C form.

    delta is a pre-softplus value when ``softplus`` (any sign), else already a positive step.
    """
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    bc = (b, N, L) if G == 0 else (b, G, N, L)
    x = dict(
        u=r(b, d, L),
        delta=r(b, d, L, scale=0.5, shift=-1.0) if softplus else r(b, d, L).abs().mul(0.3).to(dtype),
        A=-(torch.rand(d, N, generator=g, dtype=torch.float64) * 3 + 0.2).to(dtype),
        B=r(*bc),
        C=r(*bc),
        D=r(d) if D else None,
        z=r(b, d, L) if z else None,
        delta_bias=r(d, scale=0.3) if bias else None,
        initial_state=r(b, d, N) if h0 else None,
    )
    return x


def run(fn, x, softplus, grads=True, **kw):
    """Output, last state, and the gradients of a loss on both (for every tensor input)."""
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in x.items() if v is not None}
    args = {k: leaves.get(k) for k in x}
    out, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    if not grads:
        return out, last, {}
    g = torch.Generator().manual_seed(123)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gl = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    loss = (out.float() * go.float()).sum() + (last.float() * gl.float()).sum()
    names = list(leaves)
    gs = torch.autograd.grad(loss, [leaves[k] for k in names])
    return out, last, dict(zip(names, gs))


def assert_close(a, b, rtol, what):
    a, b = a.double(), b.double()
    scale = b.abs().max().item() + 1e-12
    err = (a - b).abs().max().item()
    assert err <= rtol * scale, f"{what}: max err {err:.3e} vs scale {scale:.3e} (rtol {rtol})"


def compare(x, softplus, dtype, rtol, **kw):
    o1, l1, g1 = run(kcpu.selective_scan_cpu, x, softplus, **kw)
    o2, l2, g2 = run(selective_scan_ref, x, softplus)
    assert o1.dtype == x["u"].dtype and o1.shape == o2.shape
    assert l1.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(o1, o2, rtol, "out")
    assert_close(l1, l2, rtol, "last_state")
    assert set(g1) == set(g2)
    for k in g2:
        assert g1[k].dtype == x[k].dtype and g1[k].shape == x[k].shape, k
        assert_close(g1[k], g2[k], rtol, f"grad {k}")


# (batch, dim, L, N, G, D, z, bias, softplus, initial_state)
CASES = [
    (1, 3, 1, 1, 0, False, False, False, False, False),
    (2, 4, 7, 4, 1, True, False, False, True, False),
    (2, 6, 37, 16, 2, True, True, True, True, True),
    (1, 4, 130, 16, 0, False, True, False, False, True),
    (3, 5, 130, 4, 1, True, True, True, True, False),
    (2, 4, 37, 1, 2, False, False, True, True, True),
    (1, 2, 7, 40, 1, True, True, True, True, True),  # N not a multiple of the SIMD width (generic path)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}d{}L{}N{}G{}".format(*c[:5]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_matches_reference(ext, case, dtype):
    b, d, L, N, G, D, z, bias, softplus, h0 = case
    x = make(b, d, L, N, G, dtype, D=D, z=z, bias=bias, h0=h0, softplus=softplus)
    if bias and not softplus:
        x["delta_bias"] = x["delta_bias"].abs()
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for isa in _isas(ext):
        ext.set_isa(isa)
        compare(x, softplus, dtype, rtol)
    ext.set_isa("auto")


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 1000])
def test_chunk_lengths(ext, chunk):
    x = make(2, 4, 37, 16, 1, torch.float64)
    compare(x, True, torch.float64, 1e-10, chunk_len=chunk)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_partitions(ext, threads):
    """Groups split between tasks (private dB/dC partials) and owned whole give the same gradients."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = make(3, 5, 37, 4, 1, torch.float64)  # 15 channels, groups of 5: ranges cut through groups
        compare(x, True, torch.float64, 1e-10, chunk_len=8)
        x = make(1, 8, 20, 16, 2, torch.float64, softplus=False)
        compare(x, False, torch.float64, 1e-10)
    finally:
        torch.set_num_threads(old)


def test_deterministic(ext):
    x = make(2, 6, 37, 16, 2, torch.float32)
    a = run(kcpu.selective_scan_cpu, x, True)
    b = run(kcpu.selective_scan_cpu, x, True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    for k in a[2]:
        assert torch.equal(a[2][k], b[2][k]), k


def test_low_precision_inputs(ext):
    x = make(2, 4, 37, 16, 1, torch.float32)
    xb = {k: (None if v is None else v.to(torch.bfloat16)) for k, v in x.items()}
    o1, l1, g1 = run(kcpu.selective_scan_cpu, xb, True)
    o2, l2, _ = run(selective_scan_ref, {k: (None if v is None else v.float()) for k, v in xb.items()}, True)
    assert o1.dtype == torch.bfloat16 and l1.dtype == torch.float32
    assert_close(o1, o2, 2e-2, "out")
    assert_close(l1, l2, 1e-4, "last_state")
    assert all(g1[k].dtype == torch.bfloat16 for k in g1)


def test_return_values_and_partial_grads(ext):
    x = make(1, 3, 9, 4, 0, torch.float32, h0=False)
    out = kcpu.selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 9)
    ref = selective_scan_ref(x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert_close(out, ref, 1e-5, "out")
    # only some inputs need grad; a loss on the last state alone
    A = x["A"].clone().requires_grad_()
    _, last = kcpu.selective_scan_cpu(x["u"], x["delta"], A, x["B"], x["C"], return_last_state=True)
    (gA,) = torch.autograd.grad(last.sum(), [A])
    A2 = x["A"].clone().requires_grad_()
    _, last2 = selective_scan_ref(x["u"], x["delta"], A2, x["B"], x["C"], return_last_state=True)
    (gA2,) = torch.autograd.grad(last2.sum(), [A2])
    assert_close(gA, gA2, 1e-4, "dA from last_state")


def test_gradcheck_fp64(ext):
    x = make(1, 2, 5, 3, 1, torch.float64)
    names = [k for k, v in x.items() if v is not None]

    def f(*ts):
        kw = dict(zip(names, ts))
        out, last = kcpu.selective_scan_cpu(**kw, delta_softplus=True, return_last_state=True, chunk_len=2)
        return out, last

    inputs = tuple(x[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_input_validation(ext):
    x = make(1, 3, 9, 4, 0, torch.float32, h0=False)
    with pytest.raises(ValueError):
        kcpu.selective_scan_cpu(x["u"], x["delta"][..., :5], x["A"], x["B"], x["C"])
    with pytest.raises(RuntimeError, match="B/C must be"):  # the C++ side checks what Python does not
        kcpu.selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"][:, :2], x["C"])
    with pytest.raises(ValueError):
        kcpu.selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"], x["C"], chunk_len=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_elementwise_accuracy(ext, dtype):
    """The kernel's own vector exp / softplus / sigmoid against torch's, over the whole range."""
    x = torch.cat([
        torch.linspace(-120, 100, 20001, dtype=torch.float64),
        torch.linspace(-2, 2, 4001, dtype=torch.float64),
        torch.tensor([0.0, -0.0, 20.0, 20.000001, 19.99999]),
    ]).to(dtype)
    if dtype == torch.float64:
        x = torch.cat([x, torch.linspace(-740, 720, 5001, dtype=dtype)])
    tiny = torch.finfo(dtype).tiny
    ulp = 4 * torch.finfo(dtype).eps
    # exp saturates to +inf a little early (x > 88.376 in fp32, > 709.09 in fp64): the scan never
    # gets there with finite states, so those arguments are checked for inf only.
    hi = 88.376 if dtype == torch.float32 else 709.089
    big = x[x > hi]
    x = x[x <= hi]
    for isa in _isas(ext):
        ext.set_isa(isa)
        for name, ref in [
            ("exp", torch.exp),
            ("softplus", torch.nn.functional.softplus),
            ("sigmoid", torch.sigmoid),
        ]:
            want = ref(x.double()).to(dtype).double()
            got = ext.elementwise(name, x).double()
            finite = torch.isfinite(want) & (want.abs() > tiny)
            rel = ((got - want).abs() / want.abs())[finite]
            assert rel.max().item() <= ulp, f"{name} {isa}: max rel err {rel.max().item():.2e}"
            # results below the smallest normal flush to 0, overflow is +inf
            assert (got[~finite & (want.abs() <= tiny)].abs() <= tiny).all(), name
            assert torch.equal(torch.isinf(got), torch.isinf(want)), name
        assert torch.isinf(ext.elementwise("exp", big)).all()
        special = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        e = ext.elementwise("exp", special)
        assert torch.isnan(e[0]) and e[1] == float("inf") and e[2] == 0
        s = ext.elementwise("softplus", special)
        assert torch.isnan(s[0]) and s[1] == float("inf") and s[2] == 0
    ext.set_isa("auto")


def test_disabled_by_env(monkeypatch):
    monkeypatch.setenv("HISS_DISABLE_KERNELS", "1")
    with pytest.raises(RuntimeError, match="HISS_DISABLE_KERNELS"):
        kcpu._build()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HISS_KERNEL_CACHE", str(tmp_path))
    assert kcpu.build_dir().parent == tmp_path


@pytest.mark.parametrize("block", [1, 10, 16])
def test_time_blocks(ext, block):
    """Loop order (time blocks x channels x chunks) is a tuning knob only: same results for any block."""
    old = ext.time_block()
    ext.set_time_block(block)
    try:
        x = make(3, 5, 37, 4, 1, torch.float64)
        compare(x, True, torch.float64, 1e-10, chunk_len=5)  # blocks of 1-3 chunks, a ragged last one
    finally:
        ext.set_time_block(old)
