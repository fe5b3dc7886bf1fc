"""Mamba-1 selective scan in Triton: forward and backward kernels, wrapped in an autograd.Function.

Semantics are those of ``ssm_core.ops.selective_scan.selective_scan`` (mamba_ssm's
``selective_scan_fn`` plus ``initial_state``)::

    Δ = softplus(delta + delta_bias) (when asked),  h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t
    y_t = <C_t, h_t> + D u_t,  y_t *= silu(z_t)

Design (everything below is Triton; PyTorch only allocates buffers and sums per-batch partials):

* One program per (batch, block of ``BLOCK_D`` channels inside one B/C group). The state
  ``(BLOCK_D, N)`` lives in registers in the accumulation dtype (fp32, or fp64 for fp64 inputs); the
  program walks time step by step, loading u/Δ/z for its channels and B/C for its group.
* Forward writes the output, the last state, and the state at the start of every ``chunk``
  steps: ``(batch, dim, ceil(L / chunk), N)``. No ``(batch, dim, L, N)`` tensor is ever stored.
* Backward walks the chunks in reverse. For each chunk it recomputes the states from the saved
  chunk-start state into a per-program scratch (``(batch, dim, chunk, N)`` fp32, reused by every
  chunk), then runs the adjoint recurrence ``g_t = dy_t C_t + exp(Δ_{t+1} A) g_{t+1}`` backwards
  in time. ``a_t h_{t-1}`` is obtained as ``h_t - Δ_t u_t B_t`` so no division by the decay is ever
  needed. dB/dC (shared by the channels of a group) are reduced over the program's channels and
  added with ``tl.atomic_add`` into fp32 buffers; dA, dD, d(delta_bias) are accumulated in
  registers per program and written to per-batch partial buffers that PyTorch sums over batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shape_checks import check_scan
from ._common import acc_dtype, check_device, dummy, pow2, sum_combine, tl_acc

__all__ = ["selective_scan_triton", "DEFAULT_CHUNK"]

# Time steps between saved states (forward) = length of the recompute window (backward).
DEFAULT_CHUNK = 64


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, last_ptr, states_ptr,
    dim, L, N, cpg, nblk, nchunks, chunk,
    su_b, su_d, su_l,
    sdl_b, sdl_d, sdl_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l,
    sh0_b, sh0_d, sh0_n,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_1 = tl.program_id(1)
    g = pid_1 // nblk
    j = pid_1 % nblk
    loc = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = loc < cpg
    d = g * cpg + loc
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    m2 = dmask[:, None] & nmask[None, :]

    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
    if HAS_H0:
        h0_ptrs = h0_ptr + pid_b * sh0_b + d[:, None] * sh0_d + n[None, :] * sh0_n
        h = tl.load(h0_ptrs, mask=m2, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)

    u_p = u_ptr + pid_b * su_b + d * su_d
    dl_p = delta_ptr + pid_b * sdl_b + d * sdl_d
    z_p = z_ptr + pid_b * sz_b + d * sz_d
    o_p = out_ptr + (pid_b * dim + d) * L
    B_p = B_ptr + pid_b * sB_b + g * sB_g + n * sB_n
    C_p = C_ptr + pid_b * sC_b + g * sC_g + n * sC_n
    st_p = states_ptr + ((pid_b * dim + d[:, None]) * nchunks) * N + n[None, :]

    # Plain loops with the math inlined: nested @triton.jit calls are costly under the interpreter.
    for c in range(0, nchunks):
        tl.store(st_p, h, mask=m2)
        st_p += N
        for _t in range(c * chunk, tl.minimum(c * chunk + chunk, L)):
            ut = tl.load(u_p, mask=dmask, other=0.0).to(ACC)
            dt = tl.load(dl_p, mask=dmask, other=0.0).to(ACC)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:  # softplus (threshold 20) with an accurate log1p (Kahan)
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                lp = tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))  # log1p(e), Kahan
                dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, lp))
            Bt = tl.load(B_p, mask=nmask, other=0.0).to(ACC)
            Ct = tl.load(C_p, mask=nmask, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * ut)[:, None] * Bt[None, :]
            y = tl.reduce(h * Ct[None, :], 1, sum_combine)
            if HAS_D:
                y += Dv * ut
            if HAS_Z:
                zt = tl.load(z_p, mask=dmask, other=0.0).to(ACC)
                y = y * zt / (1.0 + tl.exp(-zt))
                z_p += sz_l
            tl.store(o_p, y, mask=dmask)
            u_p += su_l
            dl_p += sdl_l
            B_p += sB_l
            C_p += sC_l
            o_p += 1
    tl.store(last_ptr + (pid_b * dim + d[:, None]) * N + n[None, :], h, mask=m2)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, dout_ptr, dlast_ptr,
    scratch_ptr,
    du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr, dh0_ptr,
    dim, L, N, G, cpg, nblk, nchunks, chunk, sc_len,
    su_b, su_d, su_l,
    sdl_b, sdl_d, sdl_l,
    sA_d, sA_n,
    sB_b, sB_g, sB_n, sB_l,
    sC_b, sC_g, sC_n, sC_l,
    sz_b, sz_d, sz_l,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr,
    SOFTPLUS: tl.constexpr, ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_1 = tl.program_id(1)
    g = pid_1 // nblk
    j = pid_1 % nblk
    loc = j * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = loc < cpg
    d = g * cpg + loc
    n = tl.arange(0, BLOCK_N)
    nmask = n < N
    m2 = dmask[:, None] & nmask[None, :]

    A = tl.load(A_ptr + d[:, None] * sA_d + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=dmask, other=0.0).to(ACC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
    sn = (pid_b * dim + d[:, None]) * N + n[None, :]  # offsets into (batch, dim, N) buffers
    if HAS_DLAST:
        gh = tl.load(dlast_ptr + sn, mask=m2, other=0.0).to(ACC)  # adjoint of the state after step t
    else:
        gh = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=ACC)
    dD_acc = tl.zeros((BLOCK_D,), dtype=ACC)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=ACC)

    u_b = u_ptr + pid_b * su_b + d * su_d
    dl_b = delta_ptr + pid_b * sdl_b + d * sdl_d
    z_b = z_ptr + pid_b * sz_b + d * sz_d
    row = (pid_b * dim + d) * L  # offsets into contiguous (batch, dim, L) buffers
    B_b = B_ptr + pid_b * sB_b + g * sB_g + n * sB_n
    C_b = C_ptr + pid_b * sC_b + g * sC_g + n * sC_n
    dBC = ((pid_b * G + g) * N + n) * L  # offsets into contiguous (batch, G, N, L) buffers
    st_b = states_ptr + ((pid_b * dim + d[:, None]) * nchunks) * N + n[None, :]
    sc_b = scratch_ptr + ((pid_b * dim + d[:, None]) * sc_len) * N + n[None, :]

    for ci in range(0, nchunks):
        c = nchunks - 1 - ci
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, L)
        # 1. recompute this chunk's states from its saved start state into the scratch
        h = tl.load(st_b + c * N, mask=m2, other=0.0).to(ACC)
        u_p = u_b + t0 * su_l
        dl_p = dl_b + t0 * sdl_l
        B_p = B_b + t0 * sB_l
        sc_p = sc_b
        for _t in range(t0, t1):
            ut = tl.load(u_p, mask=dmask, other=0.0).to(ACC)
            dt = tl.load(dl_p, mask=dmask, other=0.0).to(ACC)
            if HAS_BIAS:
                dt = dt + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(dt, 20.0))
                w = 1.0 + e
                lp = tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))  # log1p(e), Kahan
                dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, lp))
            Bt = tl.load(B_p, mask=nmask, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * ut)[:, None] * Bt[None, :]
            tl.store(sc_p, h, mask=m2)
            u_p += su_l
            dl_p += sdl_l
            B_p += sB_l
            sc_p += N
        tl.debug_barrier()
        # 2. adjoint recurrence, backwards through the chunk (gh: adjoint of the state after step t)
        tl_ = t1 - 1
        u_p = u_b + tl_ * su_l
        dl_p = dl_b + tl_ * sdl_l
        z_p = z_b + tl_ * sz_l
        B_p = B_b + tl_ * sB_l
        C_p = C_b + tl_ * sC_l
        sc_p = sc_b + (tl_ - t0) * N
        r = row + tl_  # contiguous (batch, dim, L) buffers
        q = dBC + tl_  # contiguous (batch, G, N, L) buffers
        for _ in range(t0, t1):
            ut = tl.load(u_p, mask=dmask, other=0.0).to(ACC)
            draw = tl.load(dl_p, mask=dmask, other=0.0).to(ACC)
            if HAS_BIAS:
                draw = draw + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(draw, 20.0))
                w = 1.0 + e
                lp = tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))  # log1p(e), Kahan
                dt = tl.where(draw > 20.0, draw, tl.where(w == 1.0, e, lp))
                dsp = tl.where(draw > 20.0, 1.0, e / w)  # d softplus = sigmoid
            else:
                dt = draw
            dt = tl.where(dmask, dt, 0.0)
            Bt = tl.load(B_p, mask=nmask, other=0.0).to(ACC)
            Ct = tl.load(C_p, mask=nmask, other=0.0).to(ACC)
            h = tl.load(sc_p, mask=m2, other=0.0).to(ACC)
            dy = tl.load(dout_ptr + r, mask=dmask, other=0.0).to(ACC)
            if HAS_Z:
                y = tl.reduce(h * Ct[None, :], 1, sum_combine)
                if HAS_D:
                    y += Dv * ut
                zt = tl.load(z_p, mask=dmask, other=0.0).to(ACC)
                sz = 1.0 / (1.0 + tl.exp(-zt))
                tl.store(dz_ptr + r, dy * y * sz * (1.0 + zt * (1.0 - sz)), mask=dmask)
                dy = dy * zt * sz
                z_p -= sz_l
            gh += dy[:, None] * Ct[None, :]
            tl.atomic_add(dC_ptr + q, tl.reduce(dy[:, None] * h, 0, sum_combine), mask=nmask)
            dtu = dt * ut
            gA = gh * (h - dtu[:, None] * Bt[None, :])  # gh * exp(Δ_t A) h_{t-1}
            dA_acc += gA * dt[:, None]
            gB = gh * Bt[None, :]
            ddt = tl.reduce(gA * A + gB * ut[:, None], 1, sum_combine)
            du = tl.reduce(gB, 1, sum_combine) * dt
            tl.atomic_add(dB_ptr + q, tl.reduce(gh * dtu[:, None], 0, sum_combine), mask=nmask)
            if HAS_D:
                du += dy * Dv
                dD_acc += dy * ut
            if SOFTPLUS:
                ddt = ddt * dsp
            if HAS_BIAS:
                dbias_acc += ddt
            tl.store(du_ptr + r, du, mask=dmask)
            tl.store(ddelta_ptr + r, ddt, mask=dmask)
            gh = tl.exp(dt[:, None] * A) * gh
            u_p -= su_l
            dl_p -= sdl_l
            B_p -= sB_l
            C_p -= sC_l
            sc_p -= N
            r -= 1
            q -= 1
        tl.debug_barrier()
    tl.store(dh0_ptr + sn, gh, mask=m2)
    tl.store(dA_ptr + sn, dA_acc, mask=m2)
    if HAS_D:
        tl.store(dD_ptr + pid_b * dim + d, dD_acc, mask=dmask)
    if HAS_BIAS:
        tl.store(dbias_ptr + pid_b * dim + d, dbias_acc, mask=dmask)


def _launch_cfg(cpg: int, N: int) -> tuple[int, int, int]:
    BLOCK_N = pow2(N)
    BLOCK_D = min(pow2(cpg), max(1, 256 // BLOCK_N))
    elems = BLOCK_D * BLOCK_N
    num_warps = 4 if elems >= 1024 else (2 if elems >= 256 else 1)
    return BLOCK_D, BLOCK_N, num_warps


def _bc4(X: Tensor) -> Tensor:
    return X.unsqueeze(1) if X.dim() == 3 else X


class SelectiveScanTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
        batch, dim, L = u.shape
        N = A.shape[1]
        B4, C4 = _bc4(B), _bc4(C)
        G = B4.shape[1]
        cpg = dim // G
        acc = acc_dtype(u)
        nchunks = triton.cdiv(L, chunk)
        BLOCK_D, BLOCK_N, num_warps = _launch_cfg(cpg, N)
        nblk = triton.cdiv(cpg, BLOCK_D)
        out = torch.empty(batch, dim, L, device=u.device, dtype=u.dtype)
        last = torch.empty(batch, dim, N, device=u.device, dtype=acc)
        states = torch.empty(batch, dim, nchunks, N, device=u.device, dtype=acc)
        h0 = initial_state
        zz = z if z is not None else u
        _scan_fwd_kernel[(batch, G * nblk)](
            u, delta, A, B4, C4,
            D if D is not None else dummy(u), zz, delta_bias if delta_bias is not None else dummy(u),
            h0 if h0 is not None else dummy(last),
            out, last, states,
            dim, L, N, cpg, nblk, nchunks, chunk,
            *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(), *zz.stride(),
            *(h0.stride() if h0 is not None else (0, 0, 0)),
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, HAS_H0=h0 is not None,
            SOFTPLUS=bool(delta_softplus), ACC=tl_acc(u), num_warps=num_warps,
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.cfg = (delta_softplus, chunk, initial_state is not None)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        delta_softplus, chunk, has_h0 = ctx.cfg
        batch, dim, L = u.shape
        N = A.shape[1]
        B4, C4 = _bc4(B), _bc4(C)
        G = B4.shape[1]
        cpg = dim // G
        acc = acc_dtype(u)
        nchunks = states.shape[2]
        BLOCK_D, BLOCK_N, num_warps = _launch_cfg(cpg, N)
        nblk = triton.cdiv(cpg, BLOCK_D)
        dev = u.device
        if dout is None:
            dout = torch.zeros(batch, dim, L, device=dev, dtype=u.dtype)
        dout = dout.contiguous()
        if dlast is not None:
            dlast = dlast.contiguous()
        scratch = torch.empty(batch, dim, min(chunk, L), N, device=dev, dtype=acc)
        du = torch.empty(batch, dim, L, device=dev, dtype=acc)
        ddelta = torch.empty(batch, dim, L, device=dev, dtype=acc)
        dz = torch.empty(batch, dim, L, device=dev, dtype=acc) if z is not None else None
        dA = torch.empty(batch, dim, N, device=dev, dtype=acc)
        dB = torch.zeros(batch, G, N, L, device=dev, dtype=torch.float32 if acc == torch.float32 else acc)
        dC = torch.zeros_like(dB)
        dD = torch.empty(batch, dim, device=dev, dtype=acc) if D is not None else None
        dbias = torch.empty(batch, dim, device=dev, dtype=acc) if delta_bias is not None else None
        dh0 = torch.empty(batch, dim, N, device=dev, dtype=acc)
        zz = z if z is not None else u
        _scan_bwd_kernel[(batch, G * nblk)](
            u, delta, A, B4, C4,
            D if D is not None else dummy(u), zz, delta_bias if delta_bias is not None else dummy(u),
            states, dout, dlast if dlast is not None else dummy(dh0),
            scratch,
            du, ddelta, dz if dz is not None else dummy(du), dA, dB, dC,
            dD if dD is not None else dummy(du), dbias if dbias is not None else dummy(du), dh0,
            dim, L, N, G, cpg, nblk, nchunks, chunk, scratch.shape[2],
            *u.stride(), *delta.stride(), *A.stride(), *B4.stride(), *C4.stride(), *zz.stride(),
            BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            HAS_DLAST=dlast is not None, SOFTPLUS=bool(delta_softplus), ACC=tl_acc(u), num_warps=num_warps,
        )
        dB = dB.to(B.dtype).view(B.shape) if B.dim() == 4 else dB[:, 0].to(B.dtype)
        dC = dC.to(C.dtype).view(C.shape) if C.dim() == 4 else dC[:, 0].to(C.dtype)
        return (
            du.to(u.dtype),
            ddelta.to(delta.dtype),
            dA.sum(0).to(A.dtype),
            dB,
            dC,
            None if D is None else dD.sum(0).to(D.dtype),
            None if z is None else dz.to(z.dtype),
            None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype),
            dh0 if has_h0 else None,
            None,
            None,
        )


def _check(u, delta, A, B, C, D, z, delta_bias, initial_state):
    check_scan("selective_scan_triton", u, delta, A, B, C, D, z, delta_bias, initial_state)
    check_device(u, delta, A, B, C, D, z, delta_bias, initial_state, name="selective_scan_triton")


def selective_scan_triton(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    chunk: int = DEFAULT_CHUNK,
):
    """Triton selective scan; same signature, semantics and return values as ssm_core's ``selective_scan``.

    u, delta, z: (batch, dim, L); A: (dim, N); B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias:
    (dim,); initial_state: (batch, dim, N). Inputs may be fp32 / bf16 / fp16 (state and accumulation
    fp32) or fp64 (fp64 state). Returns out (batch, dim, L) in u's dtype and, with
    ``return_last_state``, the last state (batch, dim, N) fp32 (fp64 for fp64 u). Differentiable in
    every tensor input, the initial state included, and through the last state.

    ``chunk``: steps between states saved for backward (backward memory: the inputs, plus
    ``batch*dim*N*(ceil(L/chunk) + chunk)`` fp32 values).
    """
    _check(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if chunk < 1:
        raise ValueError(f"selective_scan_triton: chunk must be positive, got {chunk}")
    out, last = SelectiveScanTritonFn.apply(
        u, delta, A, B, C, D, z, delta_bias, initial_state, bool(delta_softplus), int(chunk)
    )
    return (out, last) if return_last_state else out
