"""Mamba-2 chunked SSD (state-space duality): Triton forward kernels.

Semantics are those of ``ssm_core.ops.ssd.mamba_chunk_scan_combined`` (mamba_ssm's layouts)::

    Δ = clamp(softplus(dt + dt_bias)),  h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_t^T,
    y_t = h_t C_t + D x_t,  y_t *= silu(z_t)

with ``seq_idx`` resetting the state wherever the id changes from one position to the next.

What is Triton and what is PyTorch
----------------------------------
Forward (all Triton, four kernels, fp32 accumulation / fp64 for fp64 inputs):

1. ``_ssd_chunk_cumsum_kernel``: Δ (bias, softplus, clamp, zero past L) and the within-chunk
   cumulative sum of Δ·A, per (batch, chunk, block of heads).
2. ``_ssd_chunk_state_kernel``: the state each chunk contributes, decayed to its end,
   ``sum_s exp(cum_end - cum_s) Δ_s x_s B_s^T`` (a ``tl.dot`` over the chunk).
3. ``_ssd_state_passing_kernel``: the sequential pass over chunks that turns local states into the
   state entering each chunk (and the final state), per (batch, head, block of P*N).
4. ``_ssd_chunk_scan_kernel``: outputs: ``C_t · prev_state · exp(cum_t)`` plus the causal
   within-chunk term ``sum_{s<=t} (C_t·B_s) exp(cum_t - cum_s) Δ_s x_s`` (two ``tl.dot``), then
   ``D`` skip and ``silu(z)`` gate.

The one PyTorch step in the forward is bookkeeping for ``seq_idx``: a cumulative count of resets
(segment id per position), so the kernels test "no reset between s and t" as an equality of ids.

Backward (three Triton kernels, see the backward section below; mamba_ssm's ssd_chunk_scan /
ssd_state_passing / ssd_bmm backward decomposition, with the per-chunk pieces fused into one kernel):
the forward saves Δ, the within-chunk cumsums and the state entering each chunk,
(batch, nchunks, nheads, headdim, dstate), nothing per position beyond the inputs. The silu(z) gate and
the D skip are elementwise and differentiated in PyTorch (the gate needs the pre-gate output, which
backward recomputes with the forward's output kernel); so are the sums of per-head dB/dC over a group
and of per-chunk dA / per-position d dt_bias.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shape_checks import check_ssd
from ._common import acc_dtype, check_device, dummy, pow2, sum_combine, tl_acc

__all__ = ["mamba_chunk_scan_combined_triton"]


@triton.jit
def _ssd_chunk_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, dA_cs_ptr,
    L, H, cs, nc, lo, hi,
    sdt_b, sdt_l, sdt_h,
    BLOCK_H: tl.constexpr, BLOCK_CS: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr, ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    c = tl.program_id(1)
    h = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
    t = tl.arange(0, BLOCK_CS)
    hmask = h < H
    tg = c * cs + t
    tmask = (t < cs) & (tg < L)
    m2 = hmask[:, None] & tmask[None, :]
    dt = tl.load(dt_ptr + pid_b * sdt_b + tg[None, :] * sdt_l + h[:, None] * sdt_h, mask=m2, other=0.0)
    dt = dt.to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h, mask=hmask, other=0.0).to(ACC)[:, None]
    if SOFTPLUS:
        e = tl.exp(tl.minimum(dt, 20.0))
        w = 1.0 + e
        lp = tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))  # log1p(e), Kahan
        dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, lp))
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, lo), hi)
    dt = tl.where(m2, dt, 0.0)  # padding past L: Δ = 0 (identity decay, no input)
    A = tl.load(A_ptr + h, mask=hmask, other=0.0).to(ACC)
    dA_cs = tl.cumsum(dt * A[:, None], axis=1)
    out = ((pid_b * H + h[:, None]) * nc + c) * cs + t[None, :]
    sm = hmask[:, None] & (t < cs)[None, :]
    tl.store(dt_out_ptr + out, dt, mask=sm)
    tl.store(dA_cs_ptr + out, dA_cs, mask=sm)


@triton.jit
def _ssd_chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, dA_cs_ptr, seg_ptr, st_ptr,
    L, H, P, N, cs, nc, heads_per_group, npb,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SEQ: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    """local[b, c, h] = sum_{s in chunk} exp(cum_end - cum_s) Δ_s x_s B_s^T   -> (P, N)."""
    bc = tl.program_id(0)
    pid_b = bc // nc
    c = bc % nc
    h = tl.program_id(1)
    g = h // heads_per_group
    p = (tl.program_id(2) % npb) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(2) // npb) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = p < P
    nmask = n < N
    cbase = ((pid_b * H + h) * nc + c) * cs
    cum_end = tl.load(dA_cs_ptr + cbase + cs - 1)
    if HAS_SEQ:
        seg_end = tl.load(seg_ptr + pid_b * L + tl.minimum(c * cs + cs, L) - 1)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for k0 in range(0, cs, BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        sg = c * cs + s
        smask = (s < cs) & (sg < L)
        xs = tl.load(x_ptr + pid_b * sx_b + sg[None, :] * sx_l + h * sx_h + p[:, None] * sx_p,
                     mask=pmask[:, None] & smask[None, :], other=0.0).to(ACC)
        Bs = tl.load(B_ptr + pid_b * sB_b + sg[:, None] * sB_l + g * sB_g + n[None, :] * sB_n,
                     mask=smask[:, None] & nmask[None, :], other=0.0)
        cum_s = tl.load(dA_cs_ptr + cbase + s, mask=s < cs, other=0.0)
        dt_s = tl.load(dt_ptr + cbase + s, mask=s < cs, other=0.0)
        scale = tl.where(smask, tl.exp(cum_end - cum_s) * dt_s, 0.0)
        if HAS_SEQ:
            seg_s = tl.load(seg_ptr + pid_b * L + sg, mask=smask, other=-1)
            scale = tl.where(seg_s == seg_end, scale, 0.0)
        acc += tl.dot((xs * scale[None, :]).to(DOT), Bs.to(DOT), input_precision=PREC, out_dtype=ACC)
    out = (((pid_b * nc + c) * H + h) * P + p[:, None]) * N + n[None, :]
    tl.store(st_ptr + out, acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _ssd_state_passing_kernel(
    local_ptr, dA_cs_ptr, h0_ptr, seg_ptr, prev_ptr, final_ptr,
    L, H, PN, cs, nc,
    BLOCK: tl.constexpr, HAS_H0: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr,
):
    """prev[b, c, h] = state entering chunk c; final = state after the last chunk (flattened P*N)."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_H0:
        s = tl.load(h0_ptr + (pid_b * H + h) * PN + offs, mask=m, other=0.0).to(ACC)
    else:
        s = tl.zeros((BLOCK,), dtype=ACC)
    for c in range(0, nc):
        o = ((pid_b * nc + c) * H + h) * PN + offs
        tl.store(prev_ptr + o, s, mask=m)
        decay = tl.exp(tl.load(dA_cs_ptr + ((pid_b * H + h) * nc + c) * cs + cs - 1))
        if HAS_SEQ:
            seg_end = tl.load(seg_ptr + pid_b * L + tl.minimum(c * cs + cs, L) - 1)
            seg_in = tl.load(seg_ptr + pid_b * L + tl.maximum(c * cs - 1, 0))
            decay = tl.where(seg_end == seg_in, decay, 0.0)
        s = decay * s + tl.load(local_ptr + o, mask=m, other=0.0)
    tl.store(final_ptr + (pid_b * H + h) * PN + offs, s, mask=m)


@triton.jit
def _ssd_chunk_scan_kernel(
    x_ptr, B_ptr, C_ptr, z_ptr, D_ptr, dt_ptr, dA_cs_ptr, seg_ptr, prev_ptr, y_ptr,
    L, H, P, N, cs, nc, heads_per_group, npb,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sz_b, sz_l, sz_h, sz_p,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_D: tl.constexpr, D_HAS_P: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr, PREC: tl.constexpr,
):
    bc = tl.program_id(0)
    pid_b = bc // nc
    c = bc % nc
    h = tl.program_id(1)
    g = h // heads_per_group
    t = (tl.program_id(2) // npb) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = (tl.program_id(2) % npb) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tg = c * cs + t
    tmask = (t < cs) & (tg < L)
    pmask = p < P
    nmask = n < N
    cbase = ((pid_b * H + h) * nc + c) * cs
    cum_t = tl.load(dA_cs_ptr + cbase + t, mask=t < cs, other=0.0)
    Ct = tl.load(C_ptr + pid_b * sC_b + tg[:, None] * sC_l + g * sC_g + n[None, :] * sC_n,
                 mask=tmask[:, None] & nmask[None, :], other=0.0)
    # 1. contribution of the state entering the chunk
    prev = tl.load(prev_ptr + (((pid_b * nc + c) * H + h) * P + p[None, :]) * N + n[:, None],
                   mask=nmask[:, None] & pmask[None, :], other=0.0)
    acc = tl.dot(Ct.to(DOT), prev.to(DOT), input_precision=PREC, out_dtype=ACC)
    scale_t = tl.exp(cum_t)
    if HAS_SEQ:
        seg_t = tl.load(seg_ptr + pid_b * L + tg, mask=tmask, other=-1)
        seg_in = tl.load(seg_ptr + pid_b * L + tl.maximum(c * cs - 1, 0))
        scale_t = tl.where(seg_t == seg_in, scale_t, 0.0)
    acc = acc * scale_t[:, None]
    # 2. causal within-chunk term
    m_end = tl.minimum((tl.program_id(2) // npb) * BLOCK_M + BLOCK_M, cs)
    for k0 in range(0, m_end, BLOCK_K):
        s = k0 + tl.arange(0, BLOCK_K)
        sg = c * cs + s
        smask = (s < cs) & (sg < L)
        Bs = tl.load(B_ptr + pid_b * sB_b + sg[None, :] * sB_l + g * sB_g + n[:, None] * sB_n,
                     mask=nmask[:, None] & smask[None, :], other=0.0)
        cb = tl.dot(Ct.to(DOT), Bs.to(DOT), input_precision=PREC, out_dtype=ACC)  # (BLOCK_M, BLOCK_K)
        cum_s = tl.load(dA_cs_ptr + cbase + s, mask=s < cs, other=0.0)
        dt_s = tl.load(dt_ptr + cbase + s, mask=s < cs, other=0.0)
        ok = (t[:, None] >= s[None, :]) & smask[None, :]
        if HAS_SEQ:
            seg_s = tl.load(seg_ptr + pid_b * L + sg, mask=smask, other=-2)
            ok = ok & (seg_t[:, None] == seg_s[None, :])
        decay = tl.exp(tl.where(ok, cum_t[:, None] - cum_s[None, :], 0.0))
        wts = tl.where(ok, cb * decay * dt_s[None, :], 0.0)
        xs = tl.load(x_ptr + pid_b * sx_b + sg[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                     mask=smask[:, None] & pmask[None, :], other=0.0)
        acc += tl.dot(wts.to(DOT), xs.to(DOT), input_precision=PREC, out_dtype=ACC)
    m2 = tmask[:, None] & pmask[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + pid_b * sx_b + tg[:, None] * sx_l + h * sx_h + p[None, :] * sx_p,
                     mask=m2, other=0.0)
        if D_HAS_P:
            Dv = tl.load(D_ptr + h * P + p, mask=pmask, other=0.0).to(ACC)
        else:
            Dv = tl.load(D_ptr + h).to(ACC)
        acc += xt.to(ACC) * Dv
    if HAS_Z:
        zt = tl.load(z_ptr + pid_b * sz_b + tg[:, None] * sz_l + h * sz_h + p[None, :] * sz_p,
                     mask=m2, other=0.0)
        zt = zt.to(ACC)
        acc = acc * zt / (1.0 + tl.exp(-zt))
    tl.store(y_ptr + ((pid_b * L + tg[:, None]) * H + h) * P + p[None, :], acc, mask=m2)


def _segments(seq_idx: Tensor) -> Tensor:
    """Segment id per position: the number of resets (id changes) up to and including it."""
    reset = torch.zeros_like(seq_idx, dtype=torch.int32)
    reset[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return reset.cumsum(1, dtype=torch.int32).contiguous()


def _dot_types(x):
    ACC = tl_acc(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        return ACC, (tl.float16 if x.dtype == torch.float16 else tl.bfloat16), "ieee"
    return ACC, ACC, "ieee"


def _ssd_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit):
    """Returns y, final and the intermediates backward reuses: (dt_p, dA_cs, prev, seg)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cs = int(chunk_size)
    nc = triton.cdiv(L, cs)
    dev = x.device
    acc = acc_dtype(x)
    ACC, DOT, PREC = _dot_types(x)
    seg = _segments(seq_idx) if seq_idx is not None else None
    has_limit = tuple(dt_limit) != (0.0, math.inf)
    lo, hi = (float(dt_limit[0]), float(dt_limit[1])) if has_limit else (0.0, 0.0)

    # 1. Δ and within-chunk cumsum of Δ·A: (b, H, nc, cs)
    dt_p = torch.empty(b, H, nc, cs, device=dev, dtype=acc)
    dA_cs = torch.empty_like(dt_p)
    BH = min(pow2(H), 8)
    _ssd_chunk_cumsum_kernel[(b, nc, triton.cdiv(H, BH))](
        dt, A, dt_bias if dt_bias is not None else dummy(dt), dt_p, dA_cs,
        L, H, cs, nc, lo, hi, *dt.stride(),
        BLOCK_H=BH, BLOCK_CS=pow2(cs), HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
        HAS_LIMIT=has_limit, ACC=ACC, num_warps=4,
    )
    # 2. per-chunk local states (b, nc, H, P, N)
    local = torch.empty(b, nc, H, P, N, device=dev, dtype=acc)
    cap = 64 if DOT in (tl.float16, tl.bfloat16) else 32  # fp32/fp64 tiles take 2-4x the shared memory
    BP = min(pow2(P, 16), cap)
    BN = min(pow2(N, 16), 64)
    BK = min(pow2(cs, 16), cap)
    npb = triton.cdiv(P, BP)
    _ssd_chunk_state_kernel[(b * nc, H, npb * triton.cdiv(N, BN))](
        x, B, dt_p, dA_cs, seg if seg is not None else dummy(dt_p), local,
        L, H, P, N, cs, nc, H // G, npb, *x.stride(), *B.stride(),
        BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, HAS_SEQ=seg is not None, ACC=ACC, DOT=DOT, PREC=PREC, num_warps=4,
    )
    # 3. states entering each chunk, and the final state
    prev = torch.empty_like(local)
    final = torch.empty(b, H, P, N, device=dev, dtype=acc)
    PN = P * N
    BLK = min(pow2(PN), 1024)
    h0 = initial_states.contiguous() if initial_states is not None else None
    _ssd_state_passing_kernel[(b, H, triton.cdiv(PN, BLK))](
        local, dA_cs, h0 if h0 is not None else dummy(local), seg if seg is not None else dummy(dt_p),
        prev, final,
        L, H, PN, cs, nc,
        BLOCK=BLK, HAS_H0=h0 is not None, HAS_SEQ=seg is not None, ACC=ACC, num_warps=4,
    )
    # 4. outputs
    y = _ssd_outputs(x, B, C, z, D, dt_p, dA_cs, seg, prev, x.dtype)
    return y, final, (dt_p, dA_cs, prev, seg)


def _ssd_outputs(x, B, C, z, D, dt_p, dA_cs, seg, prev, out_dtype):
    """Step 4 of the forward: y from the states entering each chunk (also backward's recompute of y
    before the silu(z) gate)."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc, cs = dt_p.shape[2], dt_p.shape[3]
    ACC, DOT, PREC = _dot_types(x)
    cap = 64 if DOT in (tl.float16, tl.bfloat16) else 32
    BP = min(pow2(P, 16), cap)
    BK = min(pow2(cs, 16), cap)
    y = torch.empty(b, L, H, P, device=x.device, dtype=out_dtype)
    BM = min(pow2(cs, 16), cap)
    BNf = pow2(N, 16)
    npb = triton.cdiv(P, BP)
    zz = z if z is not None else x
    Dc = D.contiguous() if D is not None else None
    _ssd_chunk_scan_kernel[(b * nc, H, triton.cdiv(cs, BM) * npb)](
        x, B, C, zz, Dc if Dc is not None else dummy(dt_p), dt_p, dA_cs,
        seg if seg is not None else dummy(dt_p), prev, y,
        L, H, P, N, cs, nc, H // G, npb,
        *x.stride(), *B.stride(), *C.stride(), *zz.stride(),
        BLOCK_M=BM, BLOCK_P=BP, BLOCK_N=BNf, BLOCK_K=BK,
        HAS_D=D is not None, D_HAS_P=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ=seg is not None, ACC=ACC, DOT=DOT, PREC=PREC, num_warps=4,
    )
    return y

# ---- backward -----------------------------------------------------------------------------------
# Gradients w.r.t. the pre-gate output y_ssd (the silu(z) gate and the D skip are elementwise and
# done in PyTorch around these kernels):
#
# 5. ``_ssd_chunk_dstate_kernel``: dY_c = sum_t exp(cum_t) dy_t C_t^T, what chunk c's outputs send back
#    to the state entering it (P, N), a ``tl.dot`` over the chunk.
# 6. ``_ssd_state_passing_bwd_kernel``: the reverse pass over chunks. With g = d(state after chunk c)
#    (dfinal for the last): d(local_c) = g, d(decay_c) = <g, prev_c>, d(prev_c) = decay_c g + dY_c;
#    d(initial state) = d(prev_0).
# 7. ``_ssd_chunk_bwd_kernel``: one program per (batch, chunk, head) with the whole chunk in tiles:
#    the within-chunk quadratic term y = (C B^T o exp(segsum)) (Δ x), the inter-chunk term and the
#    chunk's local state, differentiated w.r.t. x, Δ, B, C and the cumulative sums; then the reverse
#    cumsum to d(Δ A), and softplus / clamp back to d dt. dB, dC come out per head (summed over the
#    heads of a group in PyTorch), dA per chunk.


@triton.jit
def _ssd_chunk_dstate_kernel(
    dy_ptr, C_ptr, dA_cs_ptr, seg_ptr, out_ptr,
    L, H, P, N, cs, nc, heads_per_group, npb,
    sC_b, sC_l, sC_g, sC_n,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_SEQ: tl.constexpr, ACC: tl.constexpr,
):
    bc = tl.program_id(0)
    pid_b = bc // nc
    c = bc % nc
    h = tl.program_id(1)
    g = h // heads_per_group
    p = (tl.program_id(2) % npb) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = (tl.program_id(2) // npb) * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = p < P
    nmask = n < N
    cbase = ((pid_b * H + h) * nc + c) * cs
    if HAS_SEQ:
        seg_in = tl.load(seg_ptr + pid_b * L + tl.maximum(c * cs - 1, 0))
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=ACC)
    for k0 in range(0, cs, BLOCK_K):
        t = k0 + tl.arange(0, BLOCK_K)
        tg = c * cs + t
        tmask = (t < cs) & (tg < L)
        dyt = tl.load(dy_ptr + ((pid_b * L + tg[None, :]) * H + h) * P + p[:, None],
                      mask=pmask[:, None] & tmask[None, :], other=0.0).to(ACC)
        Ct = tl.load(C_ptr + pid_b * sC_b + tg[:, None] * sC_l + g * sC_g + n[None, :] * sC_n,
                     mask=tmask[:, None] & nmask[None, :], other=0.0).to(ACC)
        cum_t = tl.load(dA_cs_ptr + cbase + t, mask=t < cs, other=0.0)
        scale = tl.where(tmask, tl.exp(cum_t), 0.0)
        if HAS_SEQ:
            seg_t = tl.load(seg_ptr + pid_b * L + tg, mask=tmask, other=-1)
            scale = tl.where(seg_t == seg_in, scale, 0.0)
        acc += tl.dot(dyt * scale[None, :], Ct, input_precision="ieee", out_dtype=ACC)
    out = (((pid_b * nc + c) * H + h) * P + p[:, None]) * N + n[None, :]
    tl.store(out_ptr + out, acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _ssd_state_passing_bwd_kernel(
    dY_ptr, prev_ptr, dA_cs_ptr, seg_ptr, dfinal_ptr, dlocal_ptr, ddecay_ptr, dh0_ptr,
    L, H, PN, cs, nc, nblk,
    BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr, ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    blk = tl.program_id(2)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    if HAS_DFINAL:
        gs = tl.load(dfinal_ptr + (pid_b * H + h) * PN + offs, mask=m, other=0.0).to(ACC)
    else:
        gs = tl.zeros((BLOCK,), dtype=ACC)
    for i in range(0, nc):
        c = nc - 1 - i
        o = ((pid_b * nc + c) * H + h) * PN + offs
        tl.store(dlocal_ptr + o, gs, mask=m)
        pv = tl.load(prev_ptr + o, mask=m, other=0.0)
        decay = tl.exp(tl.load(dA_cs_ptr + ((pid_b * H + h) * nc + c) * cs + cs - 1))
        if HAS_SEQ:
            seg_end = tl.load(seg_ptr + pid_b * L + tl.minimum(c * cs + cs, L) - 1)
            seg_in = tl.load(seg_ptr + pid_b * L + tl.maximum(c * cs - 1, 0))
            decay = tl.where(seg_end == seg_in, decay, 0.0)
        # d(decay) -> d(cum_end) = d(decay) * decay, per block of P*N (summed over blocks in PyTorch)
        tl.store(ddecay_ptr + ((pid_b * H + h) * nc + c) * nblk + blk,
                 tl.reduce(gs * pv, 0, sum_combine) * decay)
        gs = decay * gs + tl.load(dY_ptr + o, mask=m, other=0.0)
    tl.store(dh0_ptr + (pid_b * H + h) * PN + offs, gs, mask=m)


@triton.jit
def _ssd_chunk_bwd_kernel(
    x_ptr, B_ptr, C_ptr, dy_ptr, dt_ptr, dt_raw_ptr, bias_ptr, A_ptr, dA_cs_ptr, seg_ptr, prev_ptr,
    dlocal_ptr, ddec_ptr,
    dx_ptr, ddt_ptr, dB_ptr, dC_ptr, dA_ptr,
    L, H, P, N, cs, nc, heads_per_group, lo, hi,
    sx_b, sx_l, sx_h, sx_p,
    sB_b, sB_l, sB_g, sB_n,
    sC_b, sC_l, sC_g, sC_n,
    sdt_b, sdt_l, sdt_h,
    BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    ACC: tl.constexpr,
):
    bc = tl.program_id(0)
    pid_b = bc // nc
    c = bc % nc
    h = tl.program_id(1)
    g = h // heads_per_group
    t = tl.arange(0, BLOCK_T)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    tg = c * cs + t
    tin = t < cs
    tmask = tin & (tg < L)
    pmask = p < P
    nmask = n < N
    tp = tmask[:, None] & pmask[None, :]
    tn = tmask[:, None] & nmask[None, :]
    pn = pmask[:, None] & nmask[None, :]
    cbase = ((pid_b * H + h) * nc + c) * cs
    x = tl.load(x_ptr + pid_b * sx_b + tg[:, None] * sx_l + h * sx_h + p[None, :] * sx_p, mask=tp, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + ((pid_b * L + tg[:, None]) * H + h) * P + p[None, :], mask=tp, other=0.0).to(ACC)
    Bt = tl.load(B_ptr + pid_b * sB_b + tg[:, None] * sB_l + g * sB_g + n[None, :] * sB_n, mask=tn, other=0.0).to(ACC)
    Ct = tl.load(C_ptr + pid_b * sC_b + tg[:, None] * sC_l + g * sC_g + n[None, :] * sC_n, mask=tn, other=0.0).to(ACC)
    cum = tl.load(dA_cs_ptr + cbase + t, mask=tin, other=0.0)
    dlt = tl.load(dt_ptr + cbase + t, mask=tin, other=0.0)  # Δ (0 past L)
    cum_end = tl.load(dA_cs_ptr + cbase + cs - 1)
    so = ((pid_b * nc + c) * H + h) * P
    prev = tl.load(prev_ptr + (so + p[:, None]) * N + n[None, :], mask=pn, other=0.0)
    Gl = tl.load(dlocal_ptr + (so + p[:, None]) * N + n[None, :], mask=pn, other=0.0)
    ddec = tl.load(ddec_ptr + (pid_b * H + h) * nc + c)  # d(cum_end) from the chunk-to-chunk decay

    ok = (t[:, None] >= t[None, :]) & tmask[None, :] & tmask[:, None]
    scale_in = tl.where(tmask, 1.0, 0.0)  # output t sees the incoming state
    e_end = tl.where(tmask, 1.0, 0.0)     # input s reaches the chunk's end state
    if HAS_SEQ:
        seg = tl.load(seg_ptr + pid_b * L + tg, mask=tmask, other=-1)
        seg_in = tl.load(seg_ptr + pid_b * L + tl.maximum(c * cs - 1, 0))
        seg_end = tl.load(seg_ptr + pid_b * L + tl.minimum(c * cs + cs, L) - 1)
        ok = ok & (seg[:, None] == seg[None, :])
        scale_in = tl.where(seg == seg_in, scale_in, 0.0)
        e_end = tl.where(seg == seg_end, e_end, 0.0)
    scale_in = scale_in * tl.exp(cum)
    e_end = e_end * tl.exp(cum_end - cum)
    Lm = tl.where(ok, tl.exp(tl.where(ok, cum[:, None] - cum[None, :], 0.0)), 0.0)  # (t, s)
    xd = x * dlt[:, None]

    # within-chunk term: y_t = sum_s (C_t . B_s) Lm_ts xd_s
    CB = tl.dot(Ct, tl.trans(Bt), input_precision="ieee", out_dtype=ACC)
    M = CB * Lm
    dxd = tl.dot(tl.trans(M), dy, input_precision="ieee", out_dtype=ACC)          # (s, p)
    dM = tl.where(ok, tl.dot(dy, tl.trans(xd), input_precision="ieee", out_dtype=ACC), 0.0)  # (t, s)
    dCB = dM * Lm
    dC = tl.dot(dCB, Bt, input_precision="ieee", out_dtype=ACC)
    dB = tl.dot(tl.trans(dCB), Ct, input_precision="ieee", out_dtype=ACC)
    Q = dM * M
    dcum = tl.reduce(Q, 1, sum_combine) - tl.reduce(Q, 0, sum_combine)
    # incoming-state term: y_t += scale_in_t C_t . prev
    dyP = tl.dot(dy, prev, input_precision="ieee", out_dtype=ACC)                 # (t, n)
    dC += dyP * scale_in[:, None]
    dcum += scale_in * tl.reduce(dyP * Ct, 1, sum_combine)
    # the chunk's local state: local = sum_s e_end_s xd_s B_s^T
    GB = tl.dot(Bt, tl.trans(Gl), input_precision="ieee", out_dtype=ACC)           # (s, p)
    dxd += GB * e_end[:, None]
    dB += tl.dot(xd, Gl, input_precision="ieee", out_dtype=ACC) * e_end[:, None]
    de = e_end * tl.reduce(xd * GB, 1, sum_combine)
    dcum -= de
    dend = tl.reduce(de, 0, sum_combine) + ddec
    dcum += tl.where(t == cs - 1, dend, 0.0)
    # cum = within-chunk cumsum of Δ A: d(Δ_t A) = sum_{t' >= t} dcum_t'
    da = tl.cumsum(tl.where(tin, dcum, 0.0), 0, reverse=True)
    A = tl.load(A_ptr + h).to(ACC)
    ddl = tl.reduce(dxd * x, 1, sum_combine) + da * A
    tl.store(dA_ptr + (pid_b * nc + c) * H + h, tl.reduce(tl.where(tmask, da * dlt, 0.0), 0, sum_combine))
    # Δ = clamp(softplus(dt + bias)) -> d dt
    v = tl.load(dt_raw_ptr + pid_b * sdt_b + tg * sdt_l + h * sdt_h, mask=tmask, other=0.0).to(ACC)
    if HAS_BIAS:
        v += tl.load(bias_ptr + h).to(ACC)
    if SOFTPLUS:
        sig = 1.0 / (1.0 + tl.exp(-v))
        dv = ddl * tl.where(v > 20.0, 1.0, sig)
        sp = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))  # only for the clamp mask
    else:
        dv = ddl
        sp = v
    if HAS_LIMIT:  # torch's clamp passes the gradient where lo <= value <= hi
        dv = tl.where((sp >= lo) & (sp <= hi), dv, 0.0)
    tl.store(ddt_ptr + (pid_b * L + tg) * H + h, dv, mask=tmask)
    tl.store(dx_ptr + ((pid_b * L + tg[:, None]) * H + h) * P + p[None, :], dxd * dlt[:, None], mask=tp)
    tl.store(dB_ptr + ((pid_b * L + tg[:, None]) * H + h) * N + n[None, :], dB, mask=tn)
    tl.store(dC_ptr + ((pid_b * L + tg[:, None]) * H + h) * N + n[None, :], dC, mask=tn)


def _ssd_backward(ctx, dy_out, dfinal):
    x, dt, A, B, C, D, z, dt_bias, h0, dt_p, dA_cs, prev, seg = ctx.saved_tensors
    _, softplus, (lo, hi) = ctx.cfg
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc, cs = dt_p.shape[2], dt_p.shape[3]
    dev, acc = x.device, acc_dtype(x)
    ACC = tl_acc(x)
    dy = torch.zeros(b, L, H, P, device=dev, dtype=acc) if dy_out is None else dy_out.to(acc)
    dz = dD = None
    if z is not None or D is not None:
        # y = (y_ssd + D x) * silu(z): recompute the pre-gate output once, then the elementwise grads
        if z is not None:
            y_pre = _ssd_outputs(x, B, C, None, D, dt_p, dA_cs, seg, prev, acc)
            zf = z.to(acc)
            sg = torch.sigmoid(zf)
            dz = (dy * y_pre * sg * (1 + zf * (1 - sg))).to(z.dtype)
            dy = dy * zf * sg
        if D is not None:
            xf = x.to(acc)
            dD = (dy * xf).sum((0, 1)) if D.dim() == 2 else (dy * xf).sum((0, 1, 3))
            dD = dD.to(D.dtype)
    dy = dy.contiguous()
    cap = 32
    BP = min(pow2(P, 16), cap)
    BN = min(pow2(N, 16), 64)
    BK = min(pow2(cs, 16), cap)
    npb = triton.cdiv(P, BP)
    dseg = seg if seg is not None else dummy(dt_p)
    dY = torch.empty(b, nc, H, P, N, device=dev, dtype=acc)
    _ssd_chunk_dstate_kernel[(b * nc, H, npb * triton.cdiv(N, BN))](
        dy, C, dA_cs, dseg, dY, L, H, P, N, cs, nc, H // G, npb, *C.stride(),
        BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, HAS_SEQ=seg is not None, ACC=ACC, num_warps=4,
    )
    PN = P * N
    BLK = min(pow2(PN), 1024)
    nblk = triton.cdiv(PN, BLK)
    dlocal = torch.empty_like(dY)
    ddecay = torch.empty(b, H, nc, nblk, device=dev, dtype=acc)
    dh0 = torch.empty(b, H, P, N, device=dev, dtype=acc)
    dfin = dfinal.to(acc).contiguous() if dfinal is not None else None
    _ssd_state_passing_bwd_kernel[(b, H, nblk)](
        dY, prev, dA_cs, dseg, dfin if dfin is not None else dummy(dY), dlocal, ddecay, dh0,
        L, H, PN, cs, nc, nblk,
        BLOCK=BLK, HAS_DFINAL=dfin is not None, HAS_SEQ=seg is not None, ACC=ACC, num_warps=4,
    )
    ddecay = ddecay.sum(-1).contiguous()
    dx = torch.empty(b, L, H, P, device=dev, dtype=acc)
    ddt = torch.empty(b, L, H, device=dev, dtype=acc)
    dBh = torch.empty(b, L, H, N, device=dev, dtype=acc)
    dCh = torch.empty_like(dBh)
    dAc = torch.empty(b, nc, H, device=dev, dtype=acc)
    _ssd_chunk_bwd_kernel[(b * nc, H)](
        x, B, C, dy, dt_p, dt, dt_bias if dt_bias is not None else dummy(dt_p), A, dA_cs, dseg, prev,
        dlocal, ddecay, dx, ddt, dBh, dCh, dAc,
        L, H, P, N, cs, nc, H // G, float(lo), float(hi),
        *x.stride(), *B.stride(), *C.stride(), *dt.stride(),
        BLOCK_T=pow2(cs, 16), BLOCK_P=pow2(P, 16), BLOCK_N=pow2(N, 16),
        HAS_SEQ=seg is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(softplus),
        HAS_LIMIT=(lo, hi) != (0.0, math.inf), ACC=ACC, num_warps=4,
    )
    if D is not None:
        dx += dy * (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
    dB = dBh.view(b, L, G, H // G, N).sum(3)
    dC = dCh.view(b, L, G, H // G, N).sum(3)
    return (
        dx.to(x.dtype), ddt.to(dt.dtype), dAc.sum((0, 1)).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD, dz, None if dt_bias is None else ddt.sum((0, 1)).to(dt_bias.dtype),
        None if h0 is None else dh0.to(h0.dtype),
    )


class _SSDTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size, softplus, limit):
        y, final, (dt_p, dA_cs, prev, seg) = _ssd_forward(
            x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, softplus, limit)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_p, dA_cs, prev, seg)
        ctx.cfg = (chunk_size, softplus, limit)
        ctx.set_materialize_grads(False)
        return y, final

    @staticmethod
    def backward(ctx, dy, dfinal):
        grads = _ssd_backward(ctx, dy, dfinal)
        need = ctx.needs_input_grad
        return (*(gr if need[i] else None for i, gr in enumerate(grads)), None, None, None, None)


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size):
    name = "mamba_chunk_scan_combined_triton"
    check_ssd(name, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    check_device(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, name=name)


def mamba_chunk_scan_combined_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
):
    """Triton chunked SSD; same signature, semantics and return values as ssm_core's
    ``mamba_chunk_scan_combined`` (any L, no caller padding).

    x, z: (batch, L, nheads, headdim); dt: (batch, L, nheads); A, dt_bias: (nheads,); B, C:
    (batch, L, ngroups, dstate); D: (nheads,) or (nheads, headdim); initial_states:
    (batch, nheads, headdim, dstate); seq_idx: (batch, L) int. Returns y (batch, L, nheads, headdim) in
    x's dtype and, with ``return_final_states``, the final states fp32 (fp64 for fp64 x).
    Differentiable in every tensor input (the initial states included) and through the final states.
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    limit = (float(dt_limit[0]), float(dt_limit[1]))
    y, final = _SSDTritonFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, int(chunk_size),
                                  bool(dt_softplus), limit)
    return (y, final) if return_final_states else y
