"""The compiled CPU kernels (kernels.cpu) against their ssm_core reference twins: selective scan,
causal conv1d (+ decode step) and the decode-step selective state update.

The first test to need the kernel builds it (about 1.5 min with 2 cores on a cold cache; cached
afterwards under ~/.cache/hiss/kernels or $HISS_KERNEL_CACHE). Everything skips, with the reason,
when the kernel can't be built here.
"""

from __future__ import annotations

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

from ssm_core.ops import (
    causal_conv1d,
    causal_conv1d_time_major,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rms_norm,
    rms_norm_gated,
    selective_state_update,
    ssd_ref,
)
from ssm_core.ops.norm import rms_norm_ref
from ssm_core.ops.selective_scan import selective_scan_ref, selective_state_update_ref

pytestmark = pytest.mark.usefixtures("one_thread")


def _isas(ext):
    """The builds these kernels have (where the CPU has AVX-512 they run their avx2 build)."""
    return ["base", "avx2"] if ext.isa() != "base" else ["base"]


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
    with pytest.raises(ValueError, match="B must be"):
        kcpu.selective_scan_cpu(x["u"], x["delta"], x["A"], x["B"][:, :2], x["C"])
    with pytest.raises(RuntimeError, match="float32 or float64"):  # the C++ side checks dtypes
        kcpu.load().fwd(*(x[k].half() for k in ("u", "delta", "A")), x["B"][:, None].half(), x["C"][:, None].half())
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


# ---- decode-step selective state update ---------------------------------------------------------

def _step_inputs(b, layout, G, dtype, *, D=True, z=True, bias=True, T=None, seed=0):
    """Mamba-1 layout: rows = (dim,); Mamba-2: (nheads, headdim) with per-head A, dt, D broadcast as
    the Mamba2 module passes them (stride-0 expanded views). G=0: B/C without the group axis."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)

    tok = () if T is None else (T,)
    if layout[0] == 1:
        (dim,), N = layout[1:-1], layout[-1]
        rows = (dim,)
        A = -(torch.rand(dim, N, generator=g, dtype=torch.float64) * 3 + 0.2).to(dtype)
        dt = r(b, *tok, dim, scale=0.5, shift=-1.0)
        Dv, bv = (r(dim) if D else None), (r(dim, scale=0.3) if bias else None)
    else:
        H, P, N = layout[1:]
        rows = (H, P)
        A = (-(torch.rand(H, generator=g, dtype=torch.float64) * 3 + 0.2)).to(dtype)[:, None, None].expand(H, P, N)
        dt = r(b, *tok, H, scale=0.5, shift=-1.0)[..., None].expand(b, *tok, H, P)
        Dv = r(H)[:, None].expand(H, P) if D else None
        bv = r(H, scale=0.3)[:, None].expand(H, P) if bias else None
    bc = (b, *tok, N) if G == 0 else (b, *tok, G, N)
    return dict(state=r(b, *rows, N), x=r(b, *tok, *rows), dt=dt, A=A, B=r(*bc), C=r(*bc), D=Dv,
                z=r(b, *tok, *rows) if z else None, dt_bias=bv)


def _ref_tokens(x, softplus):
    """Reference: selective_state_update_ref token by token (out, final state)."""
    if x["x"].dim() == x["A"].dim():
        return selective_state_update_ref(**x, dt_softplus=softplus)
    h, outs = x["state"], []
    for t in range(x["x"].shape[1]):
        def pick(k, t=t):
            return None if x[k] is None else x[k][:, t]

        o, h = selective_state_update_ref(h, pick("x"), pick("dt"), x["A"], pick("B"), pick("C"), x["D"],
                                          pick("z"), x["dt_bias"], softplus)
        outs.append(o)
    return torch.stack(outs, 1), h


# (batch, layout, G, D, z, bias, softplus, T); layout (1, dim, N) or (2, nheads, headdim, N)
STEP_CASES = [
    (1, (1, 5, 16), 0, True, True, True, True, None),
    (3, (1, 12, 7), 3, False, False, True, True, None),   # grouped B/C, N not a multiple of 8
    (2, (1, 6, 1), 2, True, False, False, False, None),
    (2, (2, 4, 3, 16), 2, True, True, True, True, None),
    (1, (2, 3, 5, 11), 1, False, True, False, True, None),
    (2, (2, 6, 2, 9), 3, True, False, True, False, None),
    (2, (1, 6, 5), 0, True, True, True, True, 3),         # several tokens
    (1, (2, 4, 3, 8), 2, True, True, True, True, 2),
]


@pytest.mark.parametrize("case", STEP_CASES, ids=lambda c: "b{}L{}G{}T{}".format(c[0], "x".join(map(str, c[1])),
                                                                                 c[2], c[7]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_state_update_matches_reference(ext, case, dtype):
    b, layout, G, D, z, bias, softplus, T = case
    x = _step_inputs(b, layout, G, dtype, D=D, z=z, bias=bias, T=T)
    want_out, want_state = _ref_tokens(x, softplus)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for isa in _isas(ext):
        ext.set_isa(isa)
        state = x["state"].clone()
        out = kcpu.selective_state_update_cpu(**{**x, "state": state}, dt_softplus=softplus)
        assert out.dtype == dtype and out.shape == want_out.shape
        assert_close(out, want_out, rtol, "out")
        assert_close(state, want_state, rtol, "state (in place)")
    ext.set_isa("auto")


def test_state_update_dispatch(ext):
    """ssm_core dispatches to the compiled step (in place, or functional without autograd) and keeps the
    PyTorch path when gradients are needed; all three agree."""
    x = _step_inputs(2, (2, 4, 3, 16), 2, torch.float32)
    want_out, want_state = selective_state_update_ref(**x, dt_softplus=True)
    state = x["state"].clone()
    out = selective_state_update(**{**x, "state": state}, dt_softplus=True, backend="cpu")
    assert_close(out, want_out, 1e-5, "out")
    assert_close(state, want_state, 1e-5, "state")
    with torch.no_grad():
        out2, new = selective_state_update(**x, dt_softplus=True, inplace=False, backend="cpu")
    assert new.data_ptr() != x["state"].data_ptr()
    assert_close(new, want_state, 1e-5, "functional state")
    xs = {k: (v if v is None or k != "x" else v.clone().requires_grad_()) for k, v in x.items()}
    out3, _ = selective_state_update(**xs, dt_softplus=True, inplace=False, backend="cpu")
    assert out3.requires_grad  # the differentiable PyTorch path
    assert_close(out3.detach(), want_out, 1e-6, "grad path")


def test_state_update_bf16_and_strided_state(ext):
    x = _step_inputs(2, (1, 8, 16), 1, torch.float32)
    want_out, want_state = selective_state_update_ref(**x, dt_softplus=True)
    big = torch.zeros(2, 8, 32)
    big[..., ::2] = x["state"]
    state = big[..., ::2]  # not unit stride over N: updated through a copy, written back
    out = kcpu.selective_state_update_cpu(**{**x, "state": state}, dt_softplus=True)
    assert_close(out, want_out, 1e-5, "out")
    assert_close(big[..., ::2], want_state, 1e-5, "strided state")
    xb = {k: (v if v is None or k == "state" else v.bfloat16()) for k, v in x.items()}
    st = x["state"].clone()
    ob = kcpu.selective_state_update_cpu(**{**xb, "state": st}, dt_softplus=True)
    wb, ws = selective_state_update_ref(**xb, dt_softplus=True)
    assert ob.dtype == torch.bfloat16 and st.dtype == torch.float32
    assert_close(st, ws, 1e-5, "state from bf16 inputs")
    assert_close(ob.float(), wb.float(), 1e-2, "bf16 out")


def test_state_update_validation(ext):
    x = _step_inputs(2, (1, 6, 4), 0, torch.float32)
    with pytest.raises(ValueError, match="state must be"):
        kcpu.selective_state_update_cpu(**{**x, "state": x["state"][:, :, :3]})
    with pytest.raises(ValueError, match="B must be"):
        kcpu.selective_state_update_cpu(**{**x, "B": x["B"][:, :3]})
    with pytest.raises(ValueError, match="G dividing"):
        kcpu.selective_state_update_cpu(**{**x, "B": torch.zeros(2, 4, 4), "C": torch.zeros(2, 4, 4)})
    with pytest.raises(ValueError, match="dt must match"):
        kcpu.selective_state_update_cpu(**{**x, "dt": x["dt"][:1]})


# ---- causal conv1d ------------------------------------------------------------------------------

def _conv_inputs(b, d, L, W, dtype, *, bias=True, init=True, seq=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    seq_idx = None
    if seq:  # two or three packed sequences per row, cut at random places
        cuts = torch.randint(1, max(L, 2), (b, 2), generator=g)
        seq_idx = (torch.arange(L)[None, :, None] >= cuts[:, None, :]).sum(-1).to(torch.int32)
    return dict(x=r(b, d, L), weight=r(d, W), bias=r(d) if bias else None, seq_idx=seq_idx,
                initial_states=r(b, d, W - 1) if init else None)


def _conv_run(fn, x, act, grads=True):
    leaves = {k: v.detach().clone().requires_grad_(grads) for k, v in x.items()
              if v is not None and k != "seq_idx"}
    args = {k: leaves.get(k, x[k]) for k in x}
    out, final = fn(**args, return_final_states=True, activation=act)
    if not grads:
        return out, final, {}
    g = torch.Generator().manual_seed(7)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    gf = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)
    loss = (out * go).sum() + (final * gf).sum()
    names = list(leaves)
    return out, final, dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))


def _conv_ref(**kw):
    return causal_conv1d(**kw, backend="ref")


# (batch, dim, L, width, bias, initial state, seq_idx, activation)
CONV_CASES = [
    (1, 1, 1, 4, True, True, False, "silu"),
    (2, 3, 7, 4, True, False, False, "silu"),
    (2, 5, 37, 4, False, True, False, None),
    (1, 4, 130, 3, True, True, False, "silu"),
    (3, 2, 9, 2, True, True, True, "silu"),
    (2, 3, 25, 4, True, True, True, None),
    (1, 2, 5, 1, True, False, False, "silu"),   # width 1: no state
    (2, 2, 3, 6, False, True, False, "silu"),   # width > L: the state reaches past the start
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "b{}d{}L{}W{}seq{}".format(*c[:4], int(c[6])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_conv_matches_reference(ext, case, dtype):
    b, d, L, W, bias, init, seq, act = case
    x = _conv_inputs(b, d, L, W, dtype, bias=bias, init=init and W > 1, seq=seq)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for isa in _isas(ext):
        ext.set_isa(isa)
        _same_conv(_conv_run(kcpu.causal_conv1d_cpu, x, act), _conv_run(_conv_ref, x, act), x, dtype, rtol)
    ext.set_isa("auto")


def _same_conv(got, want, x, dtype, rtol):
    """(out, final state, grads) of a conv path against its reference."""
    (o1, f1, g1), (o2, f2, g2) = got, want
    assert o1.dtype == dtype and f1.shape == f2.shape
    assert_close(o1, o2, rtol, "out")
    assert torch.equal(f1, f2)
    assert set(g1) == set(g2)
    for k in g2:
        assert g1[k].dtype == dtype and g1[k].shape == x[k].shape
        assert_close(g1[k], g2[k], rtol, f"grad {k}")


def test_conv_gradcheck_fp64(ext):
    for seq in (False, True):
        x = _conv_inputs(2, 3, 6, 3, torch.float64, seq=seq)
        names = ["x", "weight", "bias", "initial_states"]

        def f(*ts, seq=x["seq_idx"]):
            return kcpu.causal_conv1d_cpu(*ts[:3], seq_idx=seq, initial_states=ts[3], return_final_states=True,
                                          activation="silu")

        assert torch.autograd.gradcheck(f, tuple(x[k].clone().requires_grad_() for k in names), eps=1e-6,
                                        atol=1e-7, rtol=1e-5)


def test_conv_dispatch_and_dtypes(ext):
    x = _conv_inputs(2, 6, 33, 4, torch.float32)
    want = causal_conv1d(**x, activation="silu", backend="ref")
    got = causal_conv1d(**x, activation="silu", backend="cpu")
    assert_close(got, want, 1e-5, "dispatched out")
    xb = {k: (v.bfloat16() if v is not None and v.is_floating_point() else v) for k, v in x.items()}
    ob, fb, gb = _conv_run(kcpu.causal_conv1d_cpu, xb, "silu")
    orf, _, _ = _conv_run(_conv_ref, {k: (v.float() if v is not None and v.is_floating_point() else v)
                                      for k, v in xb.items()}, "silu", grads=False)
    assert ob.dtype == fb.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in gb.values())
    assert_close(ob.float(), orf, 1e-2, "bf16 out")
    with pytest.raises(ValueError, match="activation"):
        kcpu.causal_conv1d_cpu(x["x"], x["weight"], activation="relu")
    with pytest.raises(ValueError, match="initial_states"):
        kcpu.causal_conv1d_cpu(x["x"], x["weight"], initial_states=x["initial_states"][..., :2])


def _time_major(fn):
    """A time-major conv (batch, L, dim) called like ``causal_conv1d`` (channel-major), for ``_conv_run``; x is handed
    over as a strided slice of a wider tensor (in_proj's layout)."""
    def call(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=True, activation=None):
        b, d, L = x.shape
        wide = torch.cat([x.transpose(1, 2), x.new_zeros(b, L, 3)], -1)
        out, final = fn(wide[..., :d], weight, bias, initial_states, activation)
        return out.transpose(1, 2), final
    return call


def _tm_torch(*args):
    return causal_conv1d_time_major(*args, backend="ref")


# (batch, dim, L, width, bias, initial state, activation): dims off the vector width, L across the 64-step
# backward blocks, a width past L
TM_CASES = [(1, 1, 1, 4, True, True, "silu"), (2, 11, 70, 4, True, True, "silu"), (2, 16, 129, 4, False, False, None),
            (1, 9, 64, 3, True, True, "silu"), (3, 5, 2, 6, True, True, None), (1, 7, 5, 1, True, False, "silu")]


@pytest.mark.parametrize("case", TM_CASES, ids=lambda c: "b{}d{}L{}W{}".format(*c[:4]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_conv_time_major_matches_channel_major_reference(ext, case, dtype):
    b, d, L, W, bias, init, act = case
    x = _conv_inputs(b, d, L, W, dtype, bias=bias, init=init and W > 1)
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    want = _conv_run(_conv_ref, x, act)
    for isa in _isas(ext):
        ext.set_isa(isa)
        for fn in (kcpu.causal_conv1d_time_major_cpu, _tm_torch):  # the kernel and the PyTorch path
            _same_conv(_conv_run(_time_major(fn), x, act), want, x, dtype, rtol)
    ext.set_isa("auto")


def test_conv_time_major_gradcheck_fp64_and_thread_count_invariant(ext):
    x = _conv_inputs(2, 3, 6, 3, torch.float64)
    ts = tuple(x[k].clone().requires_grad_() for k in ("x", "weight", "bias", "initial_states"))
    assert torch.autograd.gradcheck(
        lambda xx, w, bb, h: kcpu.causal_conv1d_time_major_cpu(xx.transpose(1, 2), w, bb, h, "silu"), ts,
        eps=1e-6, atol=1e-7, rtol=1e-5)
    # the weight / bias gradients sum fixed blocks in a fixed order: bit-identical at any thread count
    x = _conv_inputs(2, 24, 300, 4, torch.float32)
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        runs.append(_conv_run(_time_major(kcpu.causal_conv1d_time_major_cpu), x, "silu"))
    torch.set_num_threads(1)
    (o1, f1, g1), (o2, f2, g2) = runs
    assert torch.equal(o1, o2) and all(torch.equal(g1[k], g2[k]) for k in g1)


# ---- (gated) RMSNorm ----------------------------------------------------------------------------

def _norm_ref64(x, z, w, eps, size):
    """The textbook definition in fp64 (rms_norm_ref), through autograd: the twin of both norm paths."""
    h = x.double() if z is None else x.double() * torch.nn.functional.silu(z.double())
    return rms_norm_ref(h, None if w is None else w.double(), eps, size)


# (rows, channels, group size or None, gate, weight): channels off the vector width, rows across the 64-row blocks
NORM_CASES = [(1, 8, None, True, True), (70, 13, None, True, True), (130, 24, 8, True, False),
              (5, 12, 4, False, True), (3, 7, 7, False, False)]


@pytest.mark.parametrize("case", NORM_CASES, ids=lambda c: "n{}C{}g{}z{}w{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rms_norm_kernel_matches_fp64_definition_with_gradients(ext, case, dtype, monkeypatch):
    n, C, size, gate, weight = case
    g = torch.Generator().manual_seed(n + C)
    wide = (torch.randn(n, 2 * C + 3, generator=g, dtype=torch.float64) * 2).to(dtype)
    ins = dict(x=torch.randn(n, C, generator=g, dtype=torch.float64).to(dtype),
               z=wide[:, 3: 3 + C] if gate else None,  # a strided slice, like in_proj's z
               w=(1 + torch.randn(C, generator=g, dtype=torch.float64) * 0.3).to(dtype) if weight else None)
    go = torch.randn(n, C, generator=g, dtype=torch.float64)
    eps, rtol = 1e-5, (1e-5 if dtype == torch.float32 else 1e-12)

    def run(fn):
        leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in ins.items()}
        out = fn(leaves["x"], leaves["z"], leaves["w"])
        names = [k for k, v in leaves.items() if v is not None]
        return out, dict(zip(names, torch.autograd.grad((out.double() * go).sum(), [leaves[k] for k in names])))

    o_ref, g_ref = run(lambda x, z, w: _norm_ref64(x, z, w, eps, size))
    runs = [run(lambda x, z, w: kcpu.rms_norm_gated_cpu(x, z, w, eps, size)),
            run(lambda x, z, w: rms_norm_gated(x, z, w, eps, size) if z is not None else rms_norm(x, w, eps, size))]
    monkeypatch.setenv("HISS_BACKEND", "ref")  # the PyTorch path of ssm_core.ops.norm
    runs.append(run(lambda x, z, w: rms_norm_gated(x, z, w, eps, size) if z is not None else rms_norm(x, w, eps, size)))
    for out, grads in runs:
        assert out.dtype == dtype
        assert_close(out, o_ref, rtol, "out")
        assert set(grads) == set(g_ref)
        for k in g_ref:
            assert grads[k].dtype == dtype
            assert_close(grads[k], g_ref[k], rtol * 10, f"grad {k}")


def test_rms_norm_kernel_gradcheck_and_thread_count_invariant(ext):
    g = torch.Generator().manual_seed(0)
    ts = tuple(torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in ((3, 6), (3, 6), (6,)))
    assert torch.autograd.gradcheck(lambda x, z, w: kcpu.rms_norm_gated_cpu(x, z, w, 1e-5, 3), ts, eps=1e-6,
                                    atol=1e-7, rtol=1e-5)
    x, z = torch.randn(300, 40, generator=g), torch.randn(300, 40, generator=g)
    w = torch.randn(40, generator=g)
    runs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        leaves = [t.clone().requires_grad_() for t in (x, z, w)]
        out = kcpu.rms_norm_gated_cpu(*leaves, 1e-5, 8)
        runs.append([out, *torch.autograd.grad(out.square().sum(), leaves)])
    torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("W,S", [(4, 3), (4, 5), (2, 1), (3, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_conv_update_matches_reference(ext, W, S, dtype):
    g = torch.Generator().manual_seed(W * 10 + S)
    b, d = 3, 5
    x = torch.randn(b, d, generator=g, dtype=dtype)
    state = torch.randn(b, d, S, generator=g, dtype=dtype)
    weight, bias = torch.randn(d, W, generator=g, dtype=dtype), torch.randn(d, generator=g, dtype=dtype)
    for act in (None, "silu"):
        want, want_state = causal_conv1d_update(x, state, weight, bias, act, inplace=False, backend="ref")
        st = state.clone()
        out = kcpu.causal_conv1d_update_cpu(x, st, weight, bias, act)
        assert_close(out, want, 1e-6 if dtype == torch.float32 else 1e-13, "out")
        assert torch.equal(st, want_state)
        st2 = state.clone()
        out2 = causal_conv1d_update(x, st2, weight, bias, act, backend="cpu")  # dispatched, in place
        assert torch.equal(out2, out) and torch.equal(st2, st)


def test_conv_update_steps_equal_forward(ext):
    """Decode steps through the compiled update reproduce the compiled forward and its final state."""
    x = _conv_inputs(2, 4, 9, 4, torch.float32)
    full, final = kcpu.causal_conv1d_cpu(**x, return_final_states=True, activation="silu")
    st = x["initial_states"].clone()
    outs = [kcpu.causal_conv1d_update_cpu(x["x"][..., t], st, x["weight"], x["bias"], "silu") for t in range(9)]
    assert_close(torch.stack(outs, -1), full, 1e-6, "steps vs forward")
    assert torch.equal(st, final)


def test_benchmark_gpu_section_runs_on_cpu(ext, capsys):
    """The GPU benchmark code (bandwidth, time vs L, SSD vs Mamba-1) runs here at tiny sizes, so it is not
    first executed on a lent GPU; nothing is written to the docs in a dry run."""
    import argparse

    from benchmarks import scan

    doc = scan.DOC.read_text() if scan.DOC.exists() else None
    scan.gpu_section(argparse.Namespace(quick=True, gpu_dry_run=True))
    out = capsys.readouterr().out
    assert "L=2^10: scan" in out and "GB/s" in out and "dry run" in out
    assert (scan.DOC.read_text() if scan.DOC.exists() else None) == doc


@pytest.mark.parametrize("N", [16, 40, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_rows_of_A_constant_along_N(ext, N, dtype):
    """A row constant along N (SSD's per-head A, expanded) takes the one-exp-per-step path: same results and
    gradients (dA per (channel, state) included) as the reference, both ISAs."""
    x = make(2, 6, 37, N, 2, dtype)
    x["A"] = x["A"][:, :1].expand(6, N).contiguous()
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for isa in _isas(ext):
        ext.set_isa(isa)
        compare(x, True, dtype, rtol, chunk_len=16)
    ext.set_isa("auto")


# ---- SSD (Mamba-2) through the compiled scan ----------------------------------------------------

# (b, L, H, P, G, N, D shape, z, bias, softplus, h0, dt_limit)
SSD_CASES = [
    (2, 37, 4, 3, 2, 5, "H", True, True, True, True, (0.0, math.inf)),
    (1, 9, 2, 4, 1, 16, "HP", False, False, True, False, (0.05, 0.8)),
    (2, 1, 3, 2, 3, 8, None, True, True, False, True, (0.0, math.inf)),
]


@pytest.mark.parametrize("case", SSD_CASES, ids=lambda c: "b{}L{}H{}P{}G{}N{}".format(*c[:6]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_ssd_cpu_matches_reference(ext, case, dtype):
    b, L, H, P, G, N, Dk, z, bias, softplus, h0, limit = case
    g = torch.Generator().manual_seed(L)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    ins = dict(x=r(b, L, H, P), dt=r(b, L, H) if softplus else r(b, L, H).abs() * 0.5,
               A=-(torch.rand(H, generator=g, dtype=torch.float64) + 0.3).to(dtype), B=r(b, L, G, N), C=r(b, L, G, N),
               D={"H": r(H), "HP": r(H, P), None: None}[Dk], z=r(b, L, H, P) if z else None,
               dt_bias=r(H, scale=0.3) if bias else None, initial_states=r(b, H, P, N) if h0 else None)

    def run(fn):
        leaves = {k: v.clone().requires_grad_() for k, v in ins.items() if v is not None}
        y, fin = fn(**{k: leaves.get(k) for k in ins}, dt_softplus=softplus, dt_limit=limit,
                    return_final_states=True)
        gg = torch.Generator().manual_seed(1)
        loss = (y * torch.randn(y.shape, generator=gg, dtype=torch.float64).to(y.dtype)).sum() + \
            (fin * torch.randn(fin.shape, generator=gg, dtype=torch.float64).to(fin.dtype)).sum()
        names = list(leaves)
        return y, fin, dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))

    y1, f1, g1 = run(lambda **kw: kcpu.mamba_chunk_scan_combined_cpu(**kw, chunk_size=8))
    y2, f2, g2 = run(lambda **kw: ssd_ref(**kw))
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    assert y1.dtype == dtype and f1.dtype == dtype
    assert_close(y1, y2, rtol, "y")
    assert_close(f1, f2, rtol, "final state")
    assert set(g1) == set(g2)
    for k in g2:
        assert_close(g1[k], g2[k], rtol, f"grad {k}")


def test_ssd_dispatch_cpu_and_seq_idx(ext):
    """backend='cpu' runs the compiled scan; packed sequences (seq_idx) keep ssm_core's chunked path."""
    g = torch.Generator().manual_seed(0)
    x, dt = torch.randn(1, 12, 2, 3, generator=g), torch.randn(1, 12, 2, generator=g)
    A = -torch.rand(2, generator=g) - 0.3
    B, C = torch.randn(1, 12, 1, 4, generator=g), torch.randn(1, 12, 1, 4, generator=g)
    seq = torch.tensor([[0] * 5 + [1] * 7])
    for seq_idx in (None, seq):
        got = mamba_chunk_scan_combined(x, dt, A, B, C, 4, seq_idx=seq_idx, dt_softplus=True, backend="cpu")
        want = ssd_ref(x, dt, A, B, C, seq_idx=seq_idx, dt_softplus=True)
        assert_close(got, want, 1e-5, f"seq_idx={seq_idx is not None}")
    with pytest.raises(ValueError, match="seq_idx"):
        kcpu.mamba_chunk_scan_combined_cpu(x, dt, A, B, C, 4, seq_idx=seq)
