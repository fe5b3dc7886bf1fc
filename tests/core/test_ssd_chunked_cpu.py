"""ssd_matmul: Mamba-2's SSD in the chunked matmul form with a hand-written backward (the CPU fast path).

Forward, final state and every gradient against the token-by-token fp64 recurrence; chunk sizes that do
not divide L, several blocks, grouped B/C, every optional input; the CPU dispatch; memory kept for
backward; step == forward through the Mamba2 module. Small shapes: the file runs in seconds on 2 cores.
"""

import math

import pytest
import torch
from ssd_support import naive_ssd

from ssm_core import Mamba2
from ssm_core.ops import mamba_chunk_scan_combined, ssd_ref
from ssm_core.ops import ssd as ssd_mod
from ssm_core.ops.backend import SSD_CPU_ENV, ssd_cpu_impl
from ssm_core.ops.ssd import ssd_matmul

F64 = torch.float64
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def inputs(b, L, H, P, G, N, *, seed=0, dtype=F64, D="H", z=True, bias=True, h0=True):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=F64) * scale).to(dtype)

    return dict(
        x=r(b, L, H, P), dt=r(b, L, H, scale=0.5), A=-(torch.rand(H, generator=g, dtype=F64) * 3 + 0.2).to(dtype),
        B=r(b, L, G, N), C=r(b, L, G, N), D={"H": r(H), "HP": r(H, P), None: None}[D],
        z=r(b, L, H, P) if z else None, dt_bias=r(H, scale=0.3) if bias else None,
        initial_states=r(b, H, P, N) if h0 else None,
    )


def grads(fn, ins, seed=1):
    """(y, final state, {name: grad}) for a random linear loss on y and on the final state."""
    leaves = {k: v.clone().requires_grad_() for k, v in ins.items() if v is not None}
    y, h = fn(**{k: leaves.get(k) for k in ins})
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=F64).to(y.dtype)).sum() + \
        (h * torch.randn(h.shape, generator=g, dtype=F64).to(h.dtype)).sum()
    names = list(leaves)
    return y, h, dict(zip(names, torch.autograd.grad(loss, [leaves[k] for k in names])))


# (b, L, H, P, G, N, chunk, block_len, D, z, bias, h0, dt_limit)
CASES = [
    (2, 27, 4, 3, 2, 5, 4, 8, "H", True, True, True, (0.0, math.inf)),  # Q does not divide L, 4 blocks, G = 2
    (1, 37, 4, 3, 1, 6, 8, 16, "HP", False, True, True, (0.0, math.inf)),  # no gate: the saved-output path
    (2, 19, 6, 2, 3, 4, 16, 1024, None, False, False, False, (0.05, 0.9)),  # one short block, dt_limit
    (1, 33, 2, 4, 1, 8, 16, 16, "H", False, True, False, (0.0, math.inf)),  # padding in a block of its own
    (2, 1, 3, 2, 1, 4, 8, 8, "HP", True, False, True, (0.0, math.inf)),  # L = 1
    # forward in one block, backward in CPU_BWD_BLOCK-long blocks (the last one padded)
    (1, 300, 2, 3, 1, 4, 16, 1024, "H", False, True, True, (0.0, math.inf)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}L{}H{}P{}G{}N{}Q{}blk{}".format(*c[:8]))
def test_matches_fp64_recurrence_with_all_gradients(case):
    b, L, H, P, G, N, Q, blk, D, z, bias, h0, limit = case
    ins = inputs(b, L, H, P, G, N, seed=L + G, D=D, z=z, bias=bias, h0=h0)
    y, h, g = grads(lambda **kw: ssd_matmul(**kw, chunk_size=Q, block_len=blk, dt_softplus=True, dt_limit=limit,
                                            return_final_states=True), ins)
    yr, hr, gr = grads(lambda **kw: naive_ssd(**kw, dt_limit=limit), ins)
    torch.testing.assert_close(y, yr, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h, hr, atol=1e-12, rtol=1e-10)
    assert set(g) == set(gr)
    for k in gr:
        torch.testing.assert_close(g[k], gr[k], atol=1e-10, rtol=1e-9, msg=k)


@pytest.mark.parametrize("D,z", [("H", False), ("HP", True)])
def test_fp32_within_fp32_tolerance_of_fp64(D, z):
    """fp32 compute (incl. the clamped exp of very small decays) against the fp64 recurrence."""
    ins = inputs(1, 70, 4, 8, 1, 16, seed=3, dtype=torch.float32, D=D, z=z)
    ins["A"] = ins["A"] * 8  # strong decays: chunk-long products far below exp(-60)
    y, h, g = grads(lambda **kw: ssd_matmul(**kw, chunk_size=32, block_len=64, dt_softplus=True,
                                            return_final_states=True), ins)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    yr, hr, gr = grads(lambda **kw: naive_ssd(**kw), {k: None if v is None else v.double() for k, v in ins.items()})
    torch.testing.assert_close(y.double(), yr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.double(), hr, atol=1e-4, rtol=1e-4)
    for k in gr:
        scale = gr[k].abs().max().item()
        assert (g[k].double() - gr[k]).abs().max().item() <= 1e-4 * scale + 1e-5, k


def test_growing_modes_take_the_exact_mask():
    """A > 0 (or Δ < 0) breaks the 'log-decay is non-increasing' shortcut: the exact masked path runs."""
    ins = inputs(1, 21, 2, 3, 1, 4, seed=5, D="H", z=True)
    ins["A"] = torch.tensor([0.3, -0.7], dtype=F64)
    ins["dt"] = ins["dt"].abs() * 0.2
    y, h, g = grads(lambda **kw: ssd_matmul(**kw, chunk_size=8, return_final_states=True), ins)
    yr, hr, gr = grads(lambda **kw: ssd_ref(**kw, return_final_states=True), ins)
    torch.testing.assert_close(y, yr, atol=1e-11, rtol=1e-9)
    torch.testing.assert_close(h, hr, atol=1e-11, rtol=1e-9)
    for k in gr:
        torch.testing.assert_close(g[k], gr[k], atol=1e-9, rtol=1e-8, msg=k)


def test_chunk_and_block_lengths_do_not_change_the_result():
    ins = inputs(2, 50, 4, 3, 2, 5, seed=7)
    ref = ssd_matmul(**ins, chunk_size=64, dt_softplus=True)
    for Q, blk in [(4, 4), (8, 24), (16, 1024), (7, 14)]:
        y = ssd_matmul(**ins, chunk_size=Q, block_len=blk, dt_softplus=True)
        torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-10)


def test_chunked_calls_equal_one_shot():
    ins = inputs(1, 30, 2, 3, 1, 4, seed=4)
    full, h_full = ssd_matmul(**ins, chunk_size=8, dt_softplus=True, return_final_states=True)
    h, outs = ins["initial_states"], []
    for s, e in [(0, 7), (7, 8), (8, 30)]:
        piece = {k: (v[:, s:e] if k in ("x", "dt", "B", "C", "z") else v) for k, v in ins.items()}
        piece["initial_states"] = h
        y, h = ssd_matmul(**piece, chunk_size=8, dt_softplus=True, return_final_states=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(h, h_full, atol=1e-12, rtol=1e-10)


def test_bf16_inputs_fp32_compute():
    ins = inputs(1, 20, 2, 4, 1, 8, seed=8, dtype=torch.bfloat16, z=False)
    y, h, g = grads(lambda **kw: ssd_matmul(**kw, chunk_size=8, dt_softplus=True, return_final_states=True), ins)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert all(g[k].dtype == ins[k].dtype for k in g)
    yr, _ = naive_ssd(**ins)
    torch.testing.assert_close(y.double(), yr, atol=5e-2, rtol=5e-2)


def test_backward_keeps_inputs_and_chunk_states_only():
    b, L, H, P, N, Q = 1, 64, 2, 4, 8, 16
    ins = {k: None if v is None else v.requires_grad_() for k, v in inputs(b, L, H, P, 1, N, z=False).items()}
    y, _ = ssd_matmul(**ins, chunk_size=Q, dt_softplus=True, return_final_states=True)
    saved = [t for t in y.grad_fn.saved_tensors if t is not None]
    allowed = sum(v.numel() for v in ins.values() if v is not None) + y.numel() + b * H * P * N * (L // Q + 1)
    assert sum(t.numel() for t in saved) <= allowed
    assert max(t.numel() for t in saved) < b * H * L * P * N // 4  # nothing of (b, H, L, P, N) size
    with torch.no_grad():  # inference keeps nothing
        y2 = ssd_matmul(**{k: None if v is None else v.detach() for k, v in ins.items()}, chunk_size=Q,
                        dt_softplus=True)
    assert y2.grad_fn is None


def test_cpu_dispatch_picks_by_shape_and_env(monkeypatch):
    monkeypatch.delenv(SSD_CPU_ENV, raising=False)
    assert ssd_cpu_impl(128, 1024, training=True) == "matmul"
    assert ssd_cpu_impl(16, 8192, training=True) == "matmul"
    assert ssd_cpu_impl(16, 1024, training=True) == "scan"
    calls = []
    real = ssd_mod.ssd_matmul
    monkeypatch.setattr(ssd_mod, "ssd_matmul", lambda *a, **k: calls.append(1) or real(*a, **k))
    ins = inputs(1, 12, 2, 3, 1, 32, seed=2, dtype=torch.float32)
    want = ssd_ref(**ins, dt_softplus=True)
    got = mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True)
    assert calls == [1]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv(SSD_CPU_ENV, "scan")  # forced: the compiled scan (or, without a compiler, matmul)
    calls.clear()
    torch.testing.assert_close(mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True), want,
                               atol=1e-5, rtol=1e-5)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])  # packed sequences: the autograd PyTorch path
    mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True, seq_idx=seq_idx)
    mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True, backend="ref")
    monkeypatch.setenv(SSD_CPU_ENV, "matmul")
    mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True)
    assert calls == [1]
    monkeypatch.setenv(SSD_CPU_ENV, "fast")
    with pytest.raises(ValueError, match=SSD_CPU_ENV):
        mamba_chunk_scan_combined(**ins, chunk_size=8, dt_softplus=True)


def test_mamba2_module_matmul_path_matches_ref_and_steps(monkeypatch):
    """The block (d_state 32: the matmul path in training and inference) equals backend='ref', fwd and grads,
    and token-by-token steps reproduce the forward."""
    monkeypatch.delenv(SSD_CPU_ENV, raising=False)
    torch.manual_seed(0)
    m = Mamba2(16, d_state=32, headdim=8, ngroups=2, chunk_size=8).double()
    u = torch.randn(2, 23, 16, dtype=F64, requires_grad=True)
    out, st = m(u, return_state=True)
    gu, = torch.autograd.grad(out.square().sum(), u)
    monkeypatch.setenv("HISS_BACKEND", "ref")
    out_r, st_r = m(u, return_state=True)
    gu_r, = torch.autograd.grad(out_r.square().sum(), u)
    monkeypatch.delenv("HISS_BACKEND")
    torch.testing.assert_close(out, out_r, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(st.ssm, st_r.ssm, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(gu, gu_r, atol=1e-9, rtol=1e-8)
    with torch.no_grad():
        first, state = m(u[:, :15], return_state=True)
        steps = [first]
        for t in range(15, 23):
            y, state = m(u[:, t:t + 1], state=state, return_state=True)
            steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), out.detach(), atol=1e-10, rtol=1e-9)
