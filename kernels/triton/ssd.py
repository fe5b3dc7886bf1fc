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

Backward: there is no Triton backward kernel for SSD. ``mamba_chunk_scan_combined_triton`` is a
forward-only function (no autograd graph); ``ssm_core.ops.ssd.mamba_chunk_scan_combined`` wraps it
and, when gradients are needed, recomputes the output with its own PyTorch chunked SSD under
autograd in backward. Gradients are therefore exactly the reference's; the price is a PyTorch
recomputation of the forward during backward. (kernels never imports ssm_core: that glue lives there.)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import acc_dtype, check_device, dummy, pow2, tl_acc

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


def _ssd_forward(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_limit):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cs = int(chunk_size)
    nc = triton.cdiv(L, cs)
    dev = x.device
    acc = acc_dtype(x)
    ACC = tl_acc(x)
    if x.dtype in (torch.float16, torch.bfloat16):
        DOT, PREC = (tl.float16 if x.dtype == torch.float16 else tl.bfloat16), "ieee"
    else:
        DOT, PREC = ACC, "ieee"
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
    y = torch.empty(b, L, H, P, device=dev, dtype=x.dtype)
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
    return y, final


def _check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size):
    name = "mamba_chunk_scan_combined_triton"
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be (batch, L, nheads, headdim), got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if L < 1:
        raise ValueError(f"{name}: sequence length must be positive")
    if dt.shape != (b, L, H):
        raise ValueError(f"{name}: dt must be (batch={b}, L={L}, nheads={H}), got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"{name}: A must be (nheads={H},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L) or H % B.shape[2] or C.shape != B.shape:
        raise ValueError(
            f"{name}: B and C must be (batch={b}, L={L}, ngroups, dstate) with ngroups dividing nheads={H}, "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(
            f"{name}: D must be (nheads,) or (nheads, headdim) = ({H}, {P}), got {tuple(D.shape)}"
        )
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{name}: z must match x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (H,):
        raise ValueError(f"{name}: dt_bias must be (nheads={H},), got {tuple(dt_bias.shape)}")
    N = B.shape[3]
    if initial_states is not None and initial_states.shape != (b, H, P, N):
        raise ValueError(
            f"{name}: initial_states must be ({b}, {H}, {P}, {N}), got {tuple(initial_states.shape)}"
        )
    if seq_idx is not None and seq_idx.shape != (b, L):
        raise ValueError(f"{name}: seq_idx must be (batch={b}, L={L}), got {tuple(seq_idx.shape)}")
    if int(chunk_size) <= 0:
        raise ValueError(f"{name}: chunk_size must be positive, got {chunk_size}")
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
    Forward only: the result carries no autograd graph (ssm_core adds the backward, see module doc).
    """
    _check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    with torch.no_grad():
        y, final = _ssd_forward(
            x, dt, A, B, C, int(chunk_size), D, z, dt_bias, initial_states, seq_idx, bool(dt_softplus),
            (float(dt_limit[0]), float(dt_limit[1])),
        )
    return (y, final) if return_final_states else y
