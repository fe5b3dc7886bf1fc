"""Ops against independent naive float64 recurrences, gradients included."""

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from ssd_support import naive_ssd

from ssm_core.ops import (
    causal_conv1d,
    causal_conv1d_update,
    mamba_chunk_scan_combined,
    rms_norm,
    rms_norm_gated,
    selective_scan_ref,
    selective_state_update,
    ssd_ref,
)
from ssm_core.ops import selective_scan as _selective_scan

selective_scan = functools.partial(_selective_scan, backend="ref")  # the PyTorch path; kernels have their own tests
F64 = torch.float64


def naive_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, softplus=False, h0=None):
    """The Mamba-1 recurrence written out per (b, d, n), in float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, d, L = u.shape
    N = A.shape[1]
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    per_group = d // B.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if softplus:
        delta = torch.log1p(torch.exp(delta))
    group = torch.arange(d) // per_group  # channel -> its B/C group
    Bc, Cc = B[:, group], C[:, group]  # (b, d, N, L)
    h = torch.zeros(b, d, N, dtype=F64) if h0 is None else h0.double()
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * Bc[..., t]
        ys.append((h * Cc[..., t]).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, h


def make_scan_inputs(b, d, L, N, G, *, dtype=F64, seed=0, with_D=True, with_z=True, with_bias=True, with_h0=True):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    BC_shape = (b, N, L) if G == 0 else (b, G, N, L)
    return dict(
        u=r(b, d, L), delta=r(b, d, L) * 0.5, A=-(torch.rand(d, N, generator=g, dtype=dtype) * 2 + 0.1),
        B=r(*BC_shape), C=r(*BC_shape), D=r(d) if with_D else None, z=r(b, d, L) if with_z else None,
        delta_bias=r(d) * 0.5 if with_bias else None,
        initial_state=r(b, d, N) if with_h0 else None,
    )


def _grads(out, h, inputs):
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum() + (h**2).sum()
    leaves = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("G", [0, 1, 2])
@pytest.mark.parametrize("chunk_len", [None, 4, 7])
@pytest.mark.parametrize("L", [1, 13, 40])
def test_selective_scan_matches_naive_fp64(G, chunk_len, L):
    x = make_scan_inputs(2, 4, L, 3, G, seed=L + G)
    for t in x.values():
        if t is not None:
            t.requires_grad_(True)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True, chunk_len=chunk_len)
    ref_out, ref_last = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                   True, x["initial_state"])
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(last, ref_last, atol=1e-12, rtol=1e-10)
    for g1, g2 in zip(_grads(out, last, x.values()), _grads(ref_out, ref_last, x.values())):
        torch.testing.assert_close(g1, g2, atol=1e-10, rtol=1e-9)


def test_selective_scan_ref_matches_naive_and_fp32_paths_agree():
    x = make_scan_inputs(2, 6, 33, 4, 2, seed=3)
    ref_out, ref_last = naive_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                                   True, x["initial_state"])
    out, last = selective_scan_ref(**x, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    x32 = {k: None if v is None else v.float() for k, v in x.items()}
    out32, last32 = selective_scan(**x32, delta_softplus=True, return_last_state=True, chunk_len=8)
    assert out32.dtype == torch.float32 and last32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last32.double(), ref_last, atol=1e-4, rtol=1e-4)


def test_selective_scan_bf16_inputs_keep_fp32_state():
    x = make_scan_inputs(1, 4, 20, 4, 0, dtype=torch.float32, seed=5)
    xb = {k: None if v is None else (v if k in ("A", "initial_state", "D", "delta_bias") else v.bfloat16())
          for k, v in x.items()}
    out, last = selective_scan(**xb, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    ref, _ = naive_scan(*(xb[k].float() if xb[k] is not None else None for k in
                          ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), True, xb["initial_state"])
    torch.testing.assert_close(out.double(), ref, atol=0.05, rtol=0.02)


def test_selective_scan_gradcheck():
    x = make_scan_inputs(1, 2, 5, 2, 0, seed=7)
    names = list(x)

    def f(*args):
        kw = dict(zip(names, args))
        out, last = selective_scan(**kw, delta_softplus=True, return_last_state=True, chunk_len=2)
        return out, last

    args = [v.requires_grad_(True) for v in x.values()]
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-6)


def test_selective_scan_backward_keeps_no_full_state_tensor():
    b, d, L, N = 1, 8, 256, 16
    x = make_scan_inputs(b, d, L, N, 0, dtype=torch.float32, seed=1)
    for t in x.values():
        t.requires_grad_(True)
    largest = []

    def pack(t):
        largest.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = selective_scan(**x, delta_softplus=True, chunk_len=32)
    assert max(largest) < b * d * L * N / 4, f"a saved tensor has {max(largest)} elements"
    out.sum().backward()
    assert x["u"].grad is not None and x["initial_state"].grad is not None


def test_selective_scan_rejects_bad_shapes():
    x = make_scan_inputs(2, 4, 10, 3, 0)
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(**{**x, "A": x["A"][:, :2].T.contiguous()})
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(**{**x, "B": x["B"][:, :, :5]})
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(**{**x, "initial_state": x["initial_state"][:1]})
    with pytest.raises(ValueError, match="floating-point"):
        selective_scan(**{**x, "u": x["u"].long()})
    with pytest.raises(ValueError, match="B must be"):  # G does not divide dim
        selective_scan(**{**x, "B": torch.randn(2, 3, 3, 10, dtype=F64), "C": torch.randn(2, 3, 3, 10, dtype=F64)})


@settings(max_examples=15, deadline=None)
@given(b=st.integers(1, 2), d=st.integers(1, 5), L=st.integers(1, 24), N=st.integers(1, 4),
       chunk=st.integers(1, 9), softplus=st.booleans())
def test_selective_scan_property_shapes(b, d, L, N, chunk, softplus):
    x = make_scan_inputs(b, d, L, N, 0, seed=b * 100 + d * 10 + L)
    out, last = selective_scan(**x, delta_softplus=softplus, return_last_state=True, chunk_len=chunk)
    ref, ref_last = selective_scan_ref(**x, delta_softplus=softplus, return_last_state=True)
    assert out.shape == (b, d, L) and last.shape == (b, d, N)
    torch.testing.assert_close(out, ref, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(last, ref_last, atol=1e-11, rtol=1e-9)


def test_selective_state_update_one_and_several_tokens_match_scan():
    x = make_scan_inputs(2, 4, 6, 3, 2, seed=11)
    out, last = selective_scan(**x, delta_softplus=True, return_last_state=True)
    state = x["initial_state"].clone()
    ys = [selective_state_update(state, x["u"][..., t], x["delta"][..., t], x["A"], x["B"][..., t], x["C"][..., t],
                                 x["D"], x["z"][..., t], x["delta_bias"], True) for t in range(6)]
    torch.testing.assert_close(torch.stack(ys, -1), out)
    torch.testing.assert_close(state, last)  # updated in place, mamba_ssm style
    several, new_state = selective_state_update(
        x["initial_state"], x["u"].transpose(1, 2), x["delta"].transpose(1, 2), x["A"],
        x["B"].permute(0, 3, 1, 2), x["C"].permute(0, 3, 1, 2), x["D"], x["z"].transpose(1, 2),
        x["delta_bias"], True, inplace=False)
    torch.testing.assert_close(several.transpose(1, 2), out)
    torch.testing.assert_close(new_state, last)


# ---------------------------------------------------------------- SSD (Mamba-2)

def make_ssd_inputs(b, L, H, P, G, N, *, seed=0, dtype=F64, D_hdim=False):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=dtype)

    return dict(x=r(b, L, H, P), dt=r(b, L, H) * 0.5, A=-(torch.rand(H, generator=g, dtype=dtype) * 3 + 0.2),
                B=r(b, L, G, N), C=r(b, L, G, N), D=r(H, P) if D_hdim else r(H), z=r(b, L, H, P),
                dt_bias=r(H) * 0.3, initial_states=r(b, H, P, N))


@pytest.mark.parametrize("chunk_size,piece_len", [(4, None), (8, 8), (16, None), (5, 10)])
@pytest.mark.parametrize("packed", [False, True])
def test_ssd_matches_naive_fp64_with_grads(chunk_size, piece_len, packed):
    L = 27
    x = make_ssd_inputs(2, L, 4, 3, 2, 5, seed=chunk_size, D_hdim=packed)
    seq_idx = torch.tensor([[0] * 9 + [1] * 11 + [2] * 7, [0] * L]) if packed else None
    for t in x.values():
        t.requires_grad_(True)
    y, h = mamba_chunk_scan_combined(chunk_size=chunk_size, seq_idx=seq_idx, dt_softplus=True,
                                     return_final_states=True, piece_len=piece_len, **x)
    yr, hr = naive_ssd(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["dt_bias"],
                       x["initial_states"], seq_idx)
    torch.testing.assert_close(y, yr, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(h, hr, atol=1e-11, rtol=1e-9)
    for g1, g2 in zip(_grads(y.flatten(2), h, x.values()), _grads(yr.flatten(2), hr, x.values())):
        torch.testing.assert_close(g1, g2, atol=1e-9, rtol=1e-8)


def test_ssd_ref_and_dt_limit():
    x = make_ssd_inputs(1, 11, 2, 2, 1, 3, seed=2)
    limit = (0.05, 0.4)
    y, h = ssd_ref(dt_softplus=True, dt_limit=limit, return_final_states=True, **x)
    yr, hr = naive_ssd(x["x"], x["dt"], x["A"], x["B"], x["C"], x["D"], x["z"], x["dt_bias"],
                       x["initial_states"], dt_limit=limit)
    torch.testing.assert_close(y, yr)
    yc = mamba_chunk_scan_combined(chunk_size=4, dt_softplus=True, dt_limit=limit, **x)
    torch.testing.assert_close(yc, yr)


def test_ssd_equals_mamba1_scan_with_scalar_per_head_A():
    b, L, H, P, N = 2, 19, 3, 4, 5
    x = make_ssd_inputs(b, L, H, P, 1, N, seed=9)
    y = mamba_chunk_scan_combined(x["x"], x["dt"], x["A"], x["B"], x["C"], chunk_size=8, D=x["D"],
                                  dt_bias=x["dt_bias"], dt_softplus=True)
    dim = H * P
    u = x["x"].reshape(b, L, dim).transpose(1, 2)
    delta = x["dt"].repeat_interleave(P, dim=2).transpose(1, 2)
    A = x["A"].repeat_interleave(P)[:, None].expand(dim, N)
    y1 = selective_scan(u, delta, A, x["B"][:, :, 0].transpose(1, 2), x["C"][:, :, 0].transpose(1, 2),
                        x["D"].repeat_interleave(P), delta_bias=x["dt_bias"].repeat_interleave(P),
                        delta_softplus=True)
    torch.testing.assert_close(y.reshape(b, L, dim).transpose(1, 2), y1, atol=1e-11, rtol=1e-9)


def test_ssd_chunked_calls_equal_one_shot():
    x = make_ssd_inputs(1, 30, 2, 3, 1, 4, seed=4)
    full, h_full = mamba_chunk_scan_combined(chunk_size=8, dt_softplus=True, return_final_states=True, **x)
    h = x["initial_states"]
    outs = []
    for s, e in [(0, 7), (7, 8), (8, 30)]:
        piece = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in x.items()}
        piece["initial_states"] = h
        y, h = mamba_chunk_scan_combined(chunk_size=8, dt_softplus=True, return_final_states=True, **piece)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h, h_full, atol=1e-12, rtol=1e-10)


def test_ssd_rejects_bad_shapes():
    x = make_ssd_inputs(1, 8, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="ngroups dividing"):
        mamba_chunk_scan_combined(**{**x, "B": torch.randn(1, 8, 3, 3, dtype=F64),
                                     "C": torch.randn(1, 8, 3, 3, dtype=F64)}, chunk_size=4)
    with pytest.raises(ValueError, match="dt must be"):
        mamba_chunk_scan_combined(**{**x, "dt": x["dt"][:, :4]}, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        mamba_chunk_scan_combined(**x, chunk_size=0)


# ---------------------------------------------------------------- conv and norms

def test_causal_conv1d_matches_padded_conv_and_carries_state():
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 5, 17, generator=g), torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    ref = F.silu(F.conv1d(x, w[:, None], bias, padding=3, groups=5)[..., :17])
    out, final = causal_conv1d(x, w, bias, return_final_states=True, activation="silu")
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(final, x[..., -3:])
    a, s = causal_conv1d(x[..., :6], w, bias, return_final_states=True, activation="silu")
    b, _ = causal_conv1d(x[..., 6:], w, bias, initial_states=s, return_final_states=True, activation="silu")
    torch.testing.assert_close(torch.cat([a, b], -1), ref)
    state = s.clone()
    step = causal_conv1d_update(x[..., 6], state, w, bias, "silu")
    torch.testing.assert_close(step, ref[..., 6])
    torch.testing.assert_close(state, x[..., 4:7])


def test_causal_conv1d_seq_idx_isolates_packed_sequences():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 3, 12, generator=g), torch.randn(3, 4, generator=g)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    packed = causal_conv1d(x, w, seq_idx=seq_idx)
    sep = torch.cat([causal_conv1d(x[..., :5], w), causal_conv1d(x[..., 5:], w)], -1)
    torch.testing.assert_close(packed, sep)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")


def test_rms_norms():
    g = torch.Generator().manual_seed(2)
    x, z, w = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(rms_norm(x, w), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w)
    gated = x * F.silu(z)
    grouped = gated.view(3, 2, 4)
    expect = (grouped / grouped.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8) * w
    torch.testing.assert_close(rms_norm_gated(x, z, w, group_size=4), expect)
    torch.testing.assert_close(rms_norm_gated(x, z, w, norm_before_gate=True), rms_norm(x, w) * F.silu(z))
    with pytest.raises(ValueError, match="group_size"):
        rms_norm(x, w, group_size=3)
