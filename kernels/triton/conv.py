"""Depthwise causal conv1d in Triton (forward, backward, decode-step update).

Semantics are those of ``ssm_core.ops.conv.causal_conv1d`` / ``causal_conv1d_update`` (mamba_ssm's
causal_conv1d layouts): x (batch, dim, L), weight (dim, width), bias (dim,), conv state
(batch, dim, width - 1), optional silu, optional ``seq_idx`` (batch, L) for packed sequences (a tap
never reaches into another sequence id; positions before 0, i.e. the initial state, carry
``seq_idx[:, 0]``).

All of it is Triton; PyTorch only allocates buffers and sums per-tile partials of dweight / dbias:

* forward: one program per (batch, block of channels, block of time); ``width`` taps unrolled,
  loads shifted windows of x (or of the initial state for positions < 0); fp32 accumulation
  (fp64 for fp64 inputs).
  A second tiny kernel writes the final state (the last ``width - 1`` inputs).
* backward, kernel 1: recomputes the pre-activation, writes d(pre) (fp32) and per-tile partial
  sums for dweight and dbias. Kernel 2: one program per block of the padded input
  ``[initial_state, x]``, gathers ``sum_k w_k d(pre)[p - k]`` and adds the final-state gradient;
  it writes dx and d(initial_state).
* ``causal_conv1d_update_triton``: one decode step, in place (state shifted left, x appended),
  like mamba_ssm's ``causal_conv1d_update``. Not differentiable (decode only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shape_checks import check_conv, check_conv_update
from ._common import acc_dtype, check_device, dummy, pow2, sum_combine, tl_acc

__all__ = ["causal_conv1d_triton", "causal_conv1d_update_triton"]


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, out_ptr,
    dim, L,
    sx_b, sx_d, sx_l, sw_d, sw_k, si_b, si_d, si_k, ss_b, ss_l,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    dmask = d < dim
    tmask = t < L
    m2 = dmask[:, None] & tmask[None, :]
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC) + tl.load(bias_ptr + d, mask=dmask, other=0.0).to(
            ACC)[:, None]
    else:
        acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    if HAS_SEQ:
        sid_t = tl.load(seq_ptr + pid_b * ss_b + t * ss_l, mask=tmask, other=0)
    x_b = x_ptr + pid_b * sx_b + d[:, None] * sx_d
    for k in tl.static_range(W):
        p = t - (W - 1) + k
        v = tl.load(x_b + p[None, :] * sx_l, mask=m2 & (p >= 0)[None, :], other=0.0).to(ACC)
        if HAS_INIT:
            v += tl.load(init_ptr + pid_b * si_b + d[:, None] * si_d + (p + (W - 1))[None, :] * si_k,
                         mask=m2 & (p < 0)[None, :], other=0.0).to(ACC)
        if HAS_SEQ:
            sid_p = tl.load(seq_ptr + pid_b * ss_b + tl.maximum(p, 0) * ss_l, mask=tmask, other=0)
            v = tl.where((sid_p == sid_t)[None, :], v, 0.0)
        acc += tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC)[:, None] * v
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + (pid_b * dim + d[:, None]) * L + t[None, :], acc, mask=m2)


@triton.jit
def _conv_final_state_kernel(
    x_ptr, init_ptr, final_ptr,
    dim, L,
    sx_b, sx_d, sx_l, si_b, si_d, si_k,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, HAS_INIT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    j = tl.arange(0, BLOCK_W)
    m2 = (d < dim)[:, None] & (j < W - 1)[None, :]
    p = L - (W - 1) + j  # position in x of the j-th state entry (negative: still in the initial state)
    v = tl.load(x_ptr + pid_b * sx_b + d[:, None] * sx_d + p[None, :] * sx_l,
                mask=m2 & (p >= 0)[None, :], other=0.0)
    if HAS_INIT:
        v += tl.load(init_ptr + pid_b * si_b + d[:, None] * si_d + (p + (W - 1))[None, :] * si_k,
                     mask=m2 & (p < 0)[None, :], other=0.0).to(v.dtype)
    tl.store(final_ptr + (pid_b * dim + d[:, None]) * (W - 1) + j[None, :], v, mask=m2)


@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, seq_ptr, init_ptr, dout_ptr, dpre_ptr, dw_part_ptr, db_part_ptr,
    dim, L, nlblk,
    sx_b, sx_d, sx_l, sw_d, sw_k, si_b, si_d, si_k, ss_b, ss_l,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    """d(pre) = dout * act'(pre), plus this tile's partial sums of dweight (dim, W) and dbias (dim,)."""
    pid_b = tl.program_id(0)
    pid_l = tl.program_id(2)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dmask = d < dim
    tmask = t < L
    m2 = dmask[:, None] & tmask[None, :]
    if HAS_SEQ:
        sid_t = tl.load(seq_ptr + pid_b * ss_b + t * ss_l, mask=tmask, other=0)
    x_b = x_ptr + pid_b * sx_b + d[:, None] * sx_d
    row = (pid_b * dim + d[:, None]) * L + t[None, :]
    dy = tl.load(dout_ptr + row, mask=m2, other=0.0).to(ACC)
    if SILU:
        if HAS_BIAS:
            acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC) + tl.load(bias_ptr + d, mask=dmask, other=0.0).to(
                ACC)[:, None]
        else:
            acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
        for k in tl.static_range(W):
            p = t - (W - 1) + k
            v = tl.load(x_b + p[None, :] * sx_l, mask=m2 & (p >= 0)[None, :], other=0.0).to(ACC)
            if HAS_INIT:
                v += tl.load(init_ptr + pid_b * si_b + d[:, None] * si_d + (p + (W - 1))[None, :] * si_k,
                             mask=m2 & (p < 0)[None, :], other=0.0).to(ACC)
            if HAS_SEQ:
                sid_p = tl.load(seq_ptr + pid_b * ss_b + tl.maximum(p, 0) * ss_l, mask=tmask, other=0)
                v = tl.where((sid_p == sid_t)[None, :], v, 0.0)
            acc += tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC)[:, None] * v
        s = 1.0 / (1.0 + tl.exp(-acc))
        dy = dy * s * (1.0 + acc * (1.0 - s))
    tl.store(dpre_ptr + row, dy, mask=m2)
    part = (pid_b * nlblk + pid_l) * dim + d  # (batch, n_l_blocks, dim) partial buffers
    if HAS_BIAS:
        tl.store(db_part_ptr + part, tl.reduce(dy, 1, sum_combine), mask=dmask)
    for k in tl.static_range(W):
        p = t - (W - 1) + k
        v = tl.load(x_b + p[None, :] * sx_l, mask=m2 & (p >= 0)[None, :], other=0.0).to(ACC)
        if HAS_INIT:
            v += tl.load(init_ptr + pid_b * si_b + d[:, None] * si_d + (p + (W - 1))[None, :] * si_k,
                         mask=m2 & (p < 0)[None, :], other=0.0).to(ACC)
        if HAS_SEQ:
            sid_p = tl.load(seq_ptr + pid_b * ss_b + tl.maximum(p, 0) * ss_l, mask=tmask, other=0)
            v = tl.where((sid_p == sid_t)[None, :], v, 0.0)
        tl.store(dw_part_ptr + part * W + k, tl.reduce(dy * v, 1, sum_combine), mask=dmask)


@triton.jit
def _conv_bwd_x_kernel(
    w_ptr, seq_ptr, dpre_ptr, dfinal_ptr, dx_ptr, dinit_ptr,
    dim, L,
    sw_d, sw_k, ss_b, ss_l,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    HAS_SEQ: tl.constexpr, HAS_DFINAL: tl.constexpr, NEED_DINIT: tl.constexpr, ACC: tl.constexpr,
):
    """Gradient of the padded input xp = [initial_state, x] (length W - 1 + L), position p per lane."""
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    p = tl.program_id(2) * BLOCK_L + tl.arange(0, BLOCK_L)
    dmask = d < dim
    pmask = p < L + (W - 1)
    m2 = dmask[:, None] & pmask[None, :]
    tx = p - (W - 1)  # position in x (negative: initial state)
    if HAS_SEQ:
        sid_p = tl.load(seq_ptr + pid_b * ss_b + tl.maximum(tx, 0) * ss_l, mask=pmask, other=0)
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=ACC)
    g_b = dpre_ptr + (pid_b * dim + d[:, None]) * L
    for k in tl.static_range(W):
        t = p - k  # output position fed by xp[p] through tap k
        ok = (t >= 0) & (t < L) & pmask
        if HAS_SEQ:
            sid_t = tl.load(seq_ptr + pid_b * ss_b + t * ss_l, mask=ok, other=0)
            ok = ok & (sid_t == sid_p)
        g = tl.load(g_b + t[None, :], mask=dmask[:, None] & ok[None, :], other=0.0)
        acc += tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC)[:, None] * g
    if HAS_DFINAL:
        j = p - L  # final state entry j holds xp[L + j]
        acc += tl.load(dfinal_ptr + (pid_b * dim + d[:, None]) * (W - 1) + j[None, :],
                       mask=m2 & (j >= 0)[None, :], other=0.0).to(ACC)
    tl.store(dx_ptr + (pid_b * dim + d[:, None]) * L + tx[None, :], acc, mask=m2 & (tx >= 0)[None, :])
    if NEED_DINIT:
        tl.store(dinit_ptr + (pid_b * dim + d[:, None]) * (W - 1) + p[None, :], acc,
                 mask=m2 & (tx < 0)[None, :])


def _cfg(dim: int, L: int) -> tuple[int, int]:
    return min(pow2(dim), 16), min(pow2(L), 128)


class CausalConv1dTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, initial_states, silu):
        batch, dim, L = x.shape
        W = weight.shape[1]
        BD, BL = _cfg(dim, L)
        out = torch.empty(batch, dim, L, device=x.device, dtype=x.dtype)
        init = initial_states
        si = init.stride() if init is not None else (0, 0, 0)
        ss = seq_idx.stride() if seq_idx is not None else (0, 0)
        _conv_fwd_kernel[(batch, triton.cdiv(dim, BD), triton.cdiv(L, BL))](
            x, weight, bias if bias is not None else dummy(x), seq_idx if seq_idx is not None else dummy(x),
            init if init is not None else dummy(x), out,
            dim, L, *x.stride(), *weight.stride(), *si, *ss,
            W=W, BLOCK_D=BD, BLOCK_L=BL, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
            HAS_INIT=init is not None, SILU=silu, ACC=tl_acc(x), num_warps=4,
        )
        final = torch.empty(batch, dim, W - 1, device=x.device, dtype=x.dtype)
        if W > 1:
            _conv_final_state_kernel[(batch, triton.cdiv(dim, BD))](
                x, init if init is not None else dummy(x), final, dim, L, *x.stride(), *si,
                W=W, BLOCK_D=BD, BLOCK_W=pow2(W - 1), HAS_INIT=init is not None, num_warps=1,
            )
        ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
        ctx.silu = silu
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, weight, bias, seq_idx, init = ctx.saved_tensors
        batch, dim, L = x.shape
        W = weight.shape[1]
        BD, BL = _cfg(dim, L)
        dev = x.device
        acc = acc_dtype(x)
        if dout is None:
            dout = torch.zeros(batch, dim, L, device=dev, dtype=x.dtype)
        dout = dout.contiguous()
        if dfinal is not None:
            dfinal = dfinal.contiguous()
        nl = triton.cdiv(L, BL)
        dpre = torch.empty(batch, dim, L, device=dev, dtype=acc)
        dw_part = torch.empty(batch, nl, dim, W, device=dev, dtype=acc)
        db_part = torch.empty(batch, nl, dim, device=dev, dtype=acc) if bias is not None else None
        si = init.stride() if init is not None else (0, 0, 0)
        ss = seq_idx.stride() if seq_idx is not None else (0, 0)
        _conv_bwd_pre_kernel[(batch, triton.cdiv(dim, BD), nl)](
            x, weight, bias if bias is not None else dummy(x), seq_idx if seq_idx is not None else dummy(x),
            init if init is not None else dummy(x), dout, dpre, dw_part,
            db_part if db_part is not None else dpre,
            dim, L, nl, *x.stride(), *weight.stride(), *si, *ss,
            W=W, BLOCK_D=BD, BLOCK_L=BL, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
            HAS_INIT=init is not None, SILU=ctx.silu, ACC=tl_acc(x), num_warps=4,
        )
        dx = torch.empty(batch, dim, L, device=dev, dtype=acc)
        need_dinit = init is not None and ctx.needs_input_grad[4]
        dinit = torch.empty(batch, dim, W - 1, device=dev, dtype=acc) if need_dinit else None
        has_dfinal = dfinal is not None and W > 1
        _conv_bwd_x_kernel[(batch, triton.cdiv(dim, BD), triton.cdiv(L + W - 1, BL))](
            weight, seq_idx if seq_idx is not None else dummy(x), dpre,
            dfinal if has_dfinal else dummy(dpre), dx, dinit if dinit is not None else dummy(dpre),
            dim, L, *weight.stride(), *ss,
            W=W, BLOCK_D=BD, BLOCK_L=BL, HAS_SEQ=seq_idx is not None, HAS_DFINAL=has_dfinal,
            NEED_DINIT=need_dinit, ACC=tl_acc(x), num_warps=4,
        )
        return (
            dx.to(x.dtype),
            dw_part.sum((0, 1)).to(weight.dtype),
            None if bias is None else db_part.sum((0, 1)).to(bias.dtype),
            None,
            None if dinit is None else dinit.to(init.dtype),
            None,
        )


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Triton causal depthwise conv1d; signature and semantics of ssm_core's ``causal_conv1d``.

    Returns out (batch, dim, L) in x's dtype and, with ``return_final_states``, the final state
    (batch, dim, width - 1) in x's dtype. Differentiable in x, weight, bias and initial_states, and
    through the final state. Accumulation is fp32 (fp64 for fp64 x).
    """
    check_conv("causal_conv1d_triton", x, weight, bias, seq_idx, initial_states, activation)
    if initial_states is not None and weight.shape[1] == 1:
        initial_states = None
    check_device(x, weight, bias, seq_idx, initial_states, name="causal_conv1d_triton")
    out, final = CausalConv1dTritonFn.apply(x, weight, bias, seq_idx, initial_states, activation is not None)
    return (out, final) if return_final_states else out


@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, out_ptr,
    dim, S,
    sx_b, sx_d, ss_b, ss_d, ss_k, sw_d, sw_k,
    W: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < dim
    xv = tl.load(x_ptr + pid_b * sx_b + d * sx_d, mask=dmask, other=0.0)
    acc = xv.to(ACC) * tl.load(w_ptr + d * sw_d + (W - 1) * sw_k, mask=dmask, other=0.0).to(ACC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + d, mask=dmask, other=0.0).to(ACC)
    st_b = state_ptr + pid_b * ss_b + d * ss_d
    for k in tl.static_range(W - 1):
        v = tl.load(st_b + (S - (W - 1) + k) * ss_k, mask=dmask, other=0.0).to(xv.dtype).to(ACC)
        acc += tl.load(w_ptr + d * sw_d + k * sw_k, mask=dmask, other=0.0).to(ACC) * v
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(out_ptr + pid_b * dim + d, acc, mask=dmask)
    # shift the state left by one and append x (read everything before anything is written)
    j = tl.arange(0, BLOCK_S)
    m2 = dmask[:, None] & (j < S)[None, :]
    nxt = tl.load(st_b[:, None] + (j + 1)[None, :] * ss_k, mask=m2 & (j + 1 < S)[None, :], other=0.0)
    nxt = tl.where((j == S - 1)[None, :], xv[:, None].to(nxt.dtype), nxt)
    tl.debug_barrier()
    tl.store(st_b[:, None] + j[None, :] * ss_k, nxt, mask=m2)


def causal_conv1d_update_triton(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """One decode step, in place: like ssm_core's ``causal_conv1d_update`` (``inplace=True``).

    x: (batch, dim); conv_state: (batch, dim, S) with S >= width - 1, shifted left and x appended in
    place. Returns out (batch, dim) in x's dtype. Not differentiable.
    """
    check_conv_update("causal_conv1d_update_triton", x, conv_state, weight, bias, activation)
    check_device(x, conv_state, weight, bias, name="causal_conv1d_update_triton")
    batch, dim = x.shape
    S, W = conv_state.shape[-1], weight.shape[1]
    out = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    BD = min(pow2(dim), 64)
    _conv_update_kernel[(batch, triton.cdiv(dim, BD))](
        x, conv_state, weight, bias if bias is not None else dummy(x), out,
        dim, S, *x.stride(), *conv_state.stride(), *weight.stride(),
        W=W, BLOCK_D=BD, BLOCK_S=pow2(S), HAS_BIAS=bias is not None, SILU=activation is not None,
        ACC=tl_acc(x), num_warps=1,
    )
    return out
