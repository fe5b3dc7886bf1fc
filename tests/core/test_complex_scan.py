"""The complex diagonal scan (ssm_core.ops.complex_scan) and Mamba(complex_A=True).

Every path is checked against a naive fp64 recurrence written here with real arithmetic only (explicit
exp / cos / sin, real and imaginary parts as separate real tensors), so the complex autograd convention of
the ops (gradient = dL/dRe + i dL/dIm) is checked too, not assumed.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssm_core import Mamba
from ssm_core.ops.complex_scan import complex_scan, complex_scan_ref, complex_state_update, s4d_lin
from ssm_core.state import SSMState

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def naive(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, initial_state=None):
    """fp64, one step at a time, real arithmetic. Complex inputs as (..., 2) real pairs; B/C: (dim, N, 2)
    time-invariant or (batch, G, N, L, 2). Returns (y, last_state (batch, dim, N, 2))."""
    batch, dim, L = u.shape
    dt = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    dt = torch.nn.functional.softplus(dt) if delta_softplus else dt
    Ar, Ai = A[..., 0], A[..., 1]

    def at(X, t):  # real and imaginary parts of B_t / C_t, broadcastable to (batch, dim, N)
        if X.dim() == 3:
            return X[..., 0], X[..., 1]
        Xt = X[:, :, :, t].repeat_interleave(dim // X.shape[1], dim=1)
        return Xt[..., 0], Xt[..., 1]

    N = A.shape[1]
    if initial_state is None:
        hr = u.new_zeros(batch, dim, N)
        hi = u.new_zeros(batch, dim, N)
    else:
        hr, hi = initial_state[..., 0], initial_state[..., 1]
    ys = []
    for t in range(L):
        d = dt[:, :, t, None]
        mag = torch.exp(d * Ar)
        cr, ci = mag * torch.cos(d * Ai), mag * torch.sin(d * Ai)
        br, bi = at(B, t)
        du = (d * u[:, :, t, None])
        hr, hi = cr * hr - ci * hi + du * br, cr * hi + ci * hr + du * bi
        qr, qi = at(C, t)
        ys.append(2 * (qr * hr - qi * hi).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y, torch.stack([hr, hi], dim=-1)


def make(b=2, d=3, L=11, N=5, bc="invariant", *, D=True, z=True, bias=True, h0=True, softplus=True, seed=0,
         dtype=torch.float64):
    """Real-pair inputs (fp64) and the complex inputs the ops take (``dtype`` real / matching complex).
    bc: "invariant" (dim, N), "ungrouped" (batch, N, L), "grouped" (batch, G=d, N, L) (d must be a multiple)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    A_log, A_imag = s4d_lin(d, N)
    A = torch.stack([-torch.exp(A_log.double() + r(d, N, scale=0.3)), A_imag.double() + r(d, N, scale=0.5)], -1)
    bc_shape = {"invariant": (d, N, 2), "ungrouped": (b, 1, N, L, 2), "grouped": (b, d, N, L, 2)}[bc]
    pairs = dict(
        u=r(b, d, L), delta=r(b, d, L, scale=0.5, shift=-1.0 if softplus else 0.0).abs() if not softplus
        else r(b, d, L, scale=0.5, shift=-1.0),
        A=A, B=r(*bc_shape), C=r(*bc_shape),
        D=r(d) if D else None, z=r(b, d, L) if z else None, delta_bias=r(d, scale=0.3) if bias else None,
        initial_state=r(b, d, N, 2) if h0 else None,
    )
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64

    def to_op(name, X):
        if X is None:
            return None
        if X.shape[-1] == 2 and name in ("A", "B", "C", "initial_state"):
            Xc = torch.view_as_complex(X.contiguous()).to(cdt)
            return Xc.squeeze(1) if bc == "ungrouped" and name in ("B", "C") else Xc
        return X.to(dtype)

    ops = {k: to_op(k, v) for k, v in pairs.items()}
    return pairs, ops


def run_naive_with_grads(pairs, softplus, dy, dlast):
    leaves = {k: v.clone().requires_grad_(True) for k, v in pairs.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, last = naive(**args, delta_softplus=softplus)
    ((y * dy).sum() + (last * dlast).sum()).backward()
    return y.detach(), last.detach(), {k: v.grad for k, v in leaves.items()}


def run_op_with_grads(fn, ops, softplus, dy, dlast, **kw):
    leaves = {k: v.clone().requires_grad_(True) for k, v in ops.items() if v is not None}
    args = {k: leaves.get(k) for k in NAMES}
    y, last = fn(**args, delta_softplus=softplus, return_last_state=True, **kw)
    last_pairs = torch.view_as_real(last)
    ((y * dy.to(y.dtype)).sum() + (last_pairs * dlast.to(last_pairs.dtype)).sum()).backward()
    grads = {}
    for k, v in leaves.items():
        gr = v.grad
        if gr.is_complex():
            gr = torch.view_as_real(gr)
            if gr.dim() == 4 and k in ("B", "C"):  # ungrouped (batch, N, L, 2) -> (batch, 1, N, L, 2)
                gr = gr.unsqueeze(1)
        grads[k] = gr.double()
    return y.detach().double(), last_pairs.detach().double(), grads


def assert_all_close(got, want, atol, rtol, what=""):
    gy, gl, gg = got
    wy, wl, wg = want
    torch.testing.assert_close(gy, wy, atol=atol, rtol=rtol, msg=lambda m: f"{what} y: {m}")
    torch.testing.assert_close(gl, wl, atol=atol, rtol=rtol, msg=lambda m: f"{what} last state: {m}")
    assert set(gg) == set(wg)
    for k in wg:
        torch.testing.assert_close(gg[k], wg[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{what} d{k}: {m}")


CASES = [
    dict(bc="invariant"),
    dict(bc="ungrouped"),
    dict(bc="grouped"),
    dict(bc="invariant", D=False, z=False, bias=False, h0=False, softplus=False),
    dict(bc="ungrouped", z=False, h0=False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("path", ["ref", "chunked"])
def test_outputs_and_every_gradient_match_the_naive_fp64_recurrence(case, path):
    pairs, ops = make(**case)
    softplus = case.get("softplus", True)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(pairs["u"].shape, generator=g, dtype=torch.float64)
    dlast = torch.randn(*pairs["u"].shape[:2], pairs["A"].shape[1], 2, generator=g, dtype=torch.float64)
    want = run_naive_with_grads(pairs, softplus, dy, dlast)
    if path == "ref":
        got = run_op_with_grads(complex_scan_ref, ops, softplus, dy, dlast)
    else:  # the chunked PyTorch path, 4-step chunks over L = 11 (a ragged last chunk)
        got = run_op_with_grads(complex_scan, ops, softplus, dy, dlast, backend="ref", chunk_len=4)
    assert_all_close(got, want, atol=1e-10, rtol=1e-9, what=path)


def test_chunked_fp32_matches_fp64_reference():
    pairs, ops64 = make(bc="ungrouped")
    _, ops32 = make(bc="ungrouped", dtype=torch.float32)
    y64 = complex_scan_ref(**ops64, delta_softplus=True)
    y32 = complex_scan(**ops32, delta_softplus=True, backend="ref", chunk_len=4)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), y64, atol=1e-4, rtol=1e-4)


def test_two_pieces_with_the_state_carried_equal_one_shot():
    _, ops = make(L=12, bc="ungrouped", h0=False)
    y, last = complex_scan(**ops, delta_softplus=True, return_last_state=True, backend="ref")
    first = {k: (v[..., :5] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ops.items()}
    second = {k: (v[..., 5:] if k in ("u", "delta", "z", "B", "C") else v) for k, v in ops.items()}
    y1, h1 = complex_scan(**first, delta_softplus=True, return_last_state=True, backend="ref")
    y2, h2 = complex_scan(**{**second, "initial_state": h1}, delta_softplus=True, return_last_state=True,
                          backend="ref")
    torch.testing.assert_close(torch.cat([y1, y2], -1), y, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h2, last, atol=1e-12, rtol=1e-12)


def test_state_update_steps_equal_the_scan():
    _, ops = make(L=6, bc="ungrouped")
    y, last = complex_scan_ref(**ops, delta_softplus=True, return_last_state=True)
    h = ops["initial_state"]
    for t in range(6):
        out, h = complex_state_update(h, ops["u"][..., t], ops["delta"][..., t], ops["A"], ops["B"][:, None, :, t],
                                      ops["C"][:, None, :, t], ops["D"], ops["z"][..., t], ops["delta_bias"], True)
        torch.testing.assert_close(out, y[..., t], atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(h, last, atol=1e-12, rtol=1e-12)


def test_shape_errors_name_the_argument():
    _, ops = make()
    with pytest.raises(ValueError, match="A must be complex"):
        complex_scan(**{**ops, "A": ops["A"].real}, backend="ref")
    with pytest.raises(ValueError, match="B must be"):
        complex_scan(**{**ops, "B": ops["B"][:, :2]}, backend="ref")
    with pytest.raises(ValueError, match="initial_state must be complex"):
        complex_scan(**{**ops, "initial_state": ops["initial_state"].real}, backend="ref")


# ---- the module ---------------------------------------------------------------------------------------------
def test_s4d_lin_init():
    m = Mamba(16, d_state=6, complex_A=True, selective=False)
    A = m._A()
    assert A.dtype == torch.complex64 and A.shape == (32, 6)
    torch.testing.assert_close(A.real, torch.full((32, 6), -0.5))
    torch.testing.assert_close(A.imag, (math.pi * torch.arange(6.0)).expand(32, 6))
    torch.testing.assert_close(m.B.detach(), torch.stack([torch.ones(6), torch.zeros(6)], -1))  # B = 1 + 0i
    assert m.C.shape == (6, 2) and m.empty_state(3).ssm.dtype == torch.complex64
    assert not Mamba(16).complex_A and not hasattr(Mamba(16), "A_imag")  # off by default: the real layer


@pytest.mark.parametrize("selective", [False, True], ids=["lti", "selective"])
def test_module_step_equals_forward_and_pieces_equal_one_shot(selective):
    torch.manual_seed(0)
    m = Mamba(8, d_state=5, complex_A=True, selective=selective).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y, st = m(x, return_state=True)
    assert st.ssm.dtype == torch.complex128 or st.ssm.dtype == torch.complex64
    state = m.empty_state(2, dtype=torch.float64)
    steps = []
    for t in range(9):
        o, state = m(x[:, t:t + 1], state=state, return_state=True)
        steps.append(o)
    torch.testing.assert_close(torch.cat(steps, 1), y, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(state.ssm.to(st.ssm.dtype), st.ssm, atol=1e-10, rtol=1e-10)
    y1, s1 = m(x[:, :4], return_state=True)
    y2, s2 = m(x[:, 4:], state=s1, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-6, rtol=1e-6)


def test_module_gradients_reach_the_complex_parameters():
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, complex_A=True, selective=False)
    m(torch.randn(2, 7, 8)).square().sum().backward()
    for name in ("A_log", "A_imag", "B", "C", "dt_bias", "D"):
        p = getattr(m, name)
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all(), name


def test_ref_and_auto_backends_agree_in_the_module(monkeypatch):
    torch.manual_seed(0)
    m = Mamba(8, d_state=4, complex_A=True, selective=True)
    x = torch.randn(2, 20, 8)
    y_auto = m(x)  # the compiled kernel where it builds
    monkeypatch.setenv("HISS_BACKEND", "ref")
    torch.testing.assert_close(m(x), y_auto, atol=1e-5, rtol=1e-4)


def test_config_round_trip_and_fast_decoder_refuses_complex(tmp_path):
    from ssm_core.models import MambaConfig, MambaLMHeadModel
    from ssm_core.models.checkpoint import load_pretrained, save_pretrained
    from ssm_core.models.fast_decode import unsupported_reason
    from ssm_core.state import load_state, save_state

    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=32, ssm_cfg={"d_state": 4, "complex_A": True,
                                                                     "selective": False})
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    assert "complex" in unsupported_reason(model)
    save_pretrained(model, tmp_path / "m")
    again = load_pretrained(tmp_path / "m").eval()
    assert again.backbone.layers[0].mixer.complex_A
    ids = torch.randint(0, 32, (1, 12))
    out = model(ids, return_state=True)
    torch.testing.assert_close(again(ids).logits, out.logits)
    assert isinstance(out.state.layers[0], SSMState) and out.state.layers[0].ssm.is_complex()
    save_state(tmp_path / "s.safetensors", out.state, cfg)  # a complex state cartridge round-trips
    back = load_state(tmp_path / "s.safetensors", cfg)
    torch.testing.assert_close(back.layers[1].ssm, out.state.layers[1].ssm)
    assert model.generate(ids, max_new_tokens=4, seed=0).shape == (1, 16)  # falls back to the module path
