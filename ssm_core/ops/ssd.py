"""Mamba-2 state-space duality (SSD): the public op, its CPU fast path (the matmul form) and reference twins.

Per head h (scalar A_h < 0), channel p of headdim, state n; Δ = clamp(softplus(dt + dt_bias)):

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_t^T,     y_t = h_t C_t + D x_t,   y_t *= silu(z_t)

Layouts follow mamba_ssm's ``mamba_chunk_scan_combined``:
    x, z: (batch, L, nheads, headdim);  dt: (batch, L, nheads);  A, dt_bias: (nheads,)
    B, C: (batch, L, ngroups, dstate);  D: (nheads,) or (nheads, headdim)
    initial_states / final_states: (batch, nheads, headdim, dstate) fp32;  seq_idx: (batch, L) int.

Implementations (``mamba_chunk_scan_combined`` picks; on CPU through ``backend.ssd_cpu_impl``):
  * ``ssd_matmul`` -- the chunked ("dual") form with a hand-written backward, the CPU fast path from
    d_state 32, and for longer sequences at any d_state (measured, docs/kernels.md);
  * the compiled Mamba-1 scan on the expanded inputs (``kernels.cpu``): d_state < 32 and L < 2048;
  * ``_ssd_piece`` under ``chunked_recurrence`` -- the same algebra under autograd (backend="ref", and
    packed sequences, ``seq_idx``: a reset is a decay of exp(-inf) = 0; that algebra never subtracts
    cumulative sums, so the -inf stay harmless);
  * ``ssd_ref`` -- the token-by-token recurrence.

The matmul form (``ssd_matmul``). a_t = Δ_t A_h <= 0; the sequence is cut into chunks of Q steps and
acs = cumsum of a within a chunk (acs_t: the log-decay from the chunk's start to step t). Per chunk, group g
(heads k of the group share B, C), xd = Δ x:
    L[i, j]  = exp(acs_i - acs_j) for i >= j, else 0                                  (b, c, H, Q, Q)
    y_in     = ((C B^T)_g ∘ L) xd        within-chunk outputs, one (Q x Q)(Q x P) matmul per head
    S        = (xd ∘ exp(acs_end - acs))^T B    the chunk's own state at its end, (K P x Q)(Q x N) per group
    hin_{c+1} = exp(acs_end,c) hin_c + S_c      states entering each chunk: a short loop over chunks
    y        = y_in + exp(acs) ∘ (C hin^T) (+ D x, * silu(z))                       (Q x N)(N x K P)
Working layouts: time-major (b, c, Q, H, P) for x / y and the per-group matmuls (G = 1: plain views),
per-head (b, c, H, Q, P) copies for the (Q x Q) matmuls, chunk states (b, c+1, H, P, N). Blocks of
``block_len`` tokens (c = block_len / Q chunks; backward at most CPU_BWD_BLOCK) are processed at a time, so
the working set, and the cost per token, do not grow with L.

Backward (hand-written): forward saves its inputs, the states entering every chunk (b, L/Q + 1, H, P, N)
-- the same memory as the compiled scan's checkpoints at Q = 64 -- and, without a gate, its output (the
next op usually keeps it anyway); nothing of (b, H, L, Q) or (b, H, L, P, N) size. Per block, in reverse:
recompute L, C B^T, xd; dLoss/dhin from y's inter-chunk term (gy ∘ exp(acs))^T C; the reverse loop
dhin_c += exp(acs_end,c) dhin_{c+1}; then dS = dhin_{c+1} gives dxd and dB through the S matmuls, and gy
gives dxd, dC, dB through the within-chunk matmuls. The log-decays need no (Q x Q) reductions: every
factor exp(acs_i - acs_j) sends +g to i and -g to j, so

    dacs_t = <gy_t, y_t> - <xd_t, dxd_t>  (+ <dS_c, hin_{c+1}> at the chunk's last step),

then da = reverse cumsum of dacs within the chunk, dΔ = <x, dxd> + da A, dA = Σ da Δ, and dΔ goes through
the clamp / softplus / bias. Decays are clamped at exp(-60) (fp32; fp64: exp(-700)) before exp: a
chunk's products fall far below fp32's normal range, and denormals made x86's exp and the arithmetic
after it up to 100x slower; the change is < 1e-26 on a coefficient <= 1. With some a > 0 (A > 0 or
Δ < 0, never in Mamba-2) L is masked exactly instead of through C B^T's causal mask.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.shape_checks import check_ssd  # pure Python: the same shape rules as the fast paths

from .backend import ENV_VAR, fast_path, resolve_backend, ssd_cpu_impl
from .chunked import chunked_recurrence
from .selective_scan import acc_dtype, selective_state_update_ref

__all__ = ["mamba_chunk_scan_combined", "ssd_matmul", "ssd_ref", "segsum", "CPU_CHUNK", "CPU_BLOCK"]

# ssd_matmul's defaults, chosen by measurement (docs/kernels.md): chunk length Q and tokens per block; backward
# works on shorter blocks (its dozen (block, heads, headdim)-sized temporaries then stay in L2: 15-20% faster at
# d_state 128), forward is flat from 128 to 1024
CPU_CHUNK = 64
CPU_BLOCK = 1024
CPU_BWD_BLOCK = 256


def segsum(x: Tensor) -> Tensor:
    """x: (..., T) -> (..., T, T) with out[i, j] = sum_{j < k <= i} x_k for i >= j, else -inf."""
    T = x.shape[-1]
    xx = x.unsqueeze(-1).expand(*x.shape, T)  # xx[..., k, j] = x_k
    strict = torch.ones(T, T, dtype=torch.bool, device=x.device).tril(-1)
    out = torch.cumsum(xx.masked_fill(~strict, 0), dim=-2)
    return out.masked_fill(~torch.ones_like(strict).tril(), -math.inf)


def _process_dt(dt, dt_bias, dt_softplus, dt_limit):
    dt = dt.to(acc_dtype(dt))
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, math.inf):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def _skip_and_gate(y, x, D, z):
    if D is not None:
        y = y + x.to(y.dtype) * (D.to(y.dtype)[:, None] if D.dim() == 1 else D.to(y.dtype))
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _ssd_piece(x, dt, A, B, C, D, z, dt_bias, reset, h0, *, chunk_size, dt_softplus, dt_limit):
    """SSD on one piece of the sequence with incoming state h0; returns (y, h_last), both in acc dtype."""
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    K = H // G  # heads per group
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    dA = dt * A.to(dt.dtype)  # (b, L, H)
    if reset is not None:
        dA = dA.masked_fill(reset.unsqueeze(-1), -math.inf)
    acc = dt.dtype
    xd = x.to(acc) * dt.unsqueeze(-1)
    Bf, Cf = B.to(acc), C.to(acc)
    pad = (-L) % chunk_size  # pad with Δ = 0: identity decay, no input, final state unchanged
    if pad:
        xd, Bf, Cf = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xd, Bf, Cf))
        dA = F.pad(dA, (0, 0, 0, pad))
    c, T = (L + pad) // chunk_size, chunk_size
    xv = xd.view(b, c, T, G, K, P)
    Bv, Cv = Bf.view(b, c, T, G, N), Cf.view(b, c, T, G, N)
    a = dA.view(b, c, T, G, K).permute(0, 1, 3, 4, 2)  # (b, c, G, K, T)

    # 1. within-chunk outputs (the quadratic, attention-like form)
    decay = torch.exp(segsum(a))  # (b, c, G, K, T, T)
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cv, Bv).unsqueeze(3) * decay
    y = torch.einsum("bcgkts,bcsgkp->bctgkp", scores, xv)

    # 2. state contributed by each chunk, decayed to the chunk end (exclusive reverse cumsum)
    rev = a.flip(-1).cumsum(-1).flip(-1)
    to_end = torch.exp(torch.cat([rev[..., 1:], torch.zeros_like(rev[..., :1])], dim=-1))
    states = torch.einsum("bcsgn,bcgks,bcsgkp->bcgkpn", Bv, to_end, xv)

    # 3. pass states across chunk boundaries
    totals = a.sum(-1)  # (b, c, G, K)
    states = torch.cat([h0.to(acc).view(b, 1, G, K, P, N), states], dim=1)
    chunk_decay = torch.exp(segsum(F.pad(totals.permute(0, 2, 3, 1), (1, 0))))  # (b, G, K, c+1, c+1)
    states = torch.einsum("bgkzc,bcgkpn->bzgkpn", chunk_decay, states)
    prev, h_last = states[:, :-1], states[:, -1]

    # 4. outputs from the state entering each chunk
    from_start = torch.exp(a.cumsum(-1))  # (b, c, G, K, T)
    y = y + torch.einsum("bctgn,bcgkpn,bcgkt->bctgkp", Cv, prev, from_start)
    y = y.reshape(b, c * T, H, P)[:, :L]
    # clone: a view of `states` would keep every chunk's state alive as long as the final state lives
    return _skip_and_gate(y, x, D, z), h_last.reshape(b, H, P, N).clone()


# ---- the matmul form on CPU: a custom autograd Function with a hand-written, recomputing backward ----

def _tril(Q: int, dtype: torch.dtype, device) -> Tensor:
    """(Q, Q) lower-triangular ones (the causal mask of a chunk), cached."""
    key = (Q, dtype, str(device))
    m = _TRIL.get(key)
    if m is None:
        m = _TRIL[key] = torch.ones(Q, Q, dtype=dtype, device=device).tril()
    return m


_TRIL: dict = {}


def _exp_(t: Tensor, hi: float | None = None) -> Tensor:
    """exp in place of log-decays, first clamped to >= -60 (fp64: -700) and, when ``hi`` is given, <= hi.

    A chunk's decays reach exp(-100) and far below, and x86 computes exp into or near the denormal range
    in microcode: 1.5M such values took 26-78 ms instead of 0.6 ms. Clamping changes a coefficient
    (<= 1) by less than 1e-26 (fp64: 1e-304).
    """
    return t.clamp_(min=-700.0 if t.dtype == torch.float64 else -60.0, max=hi).exp_()


def _delta_and_slope(dt, dt_bias, dt_softplus, dt_limit, acc):
    """Δ = clamp(softplus(dt + dt_bias)) and dΔ/d(dt) (None where it is 1 everywhere)."""
    v = dt.to(acc)
    if dt_bias is not None:
        v = v + dt_bias.to(acc)
    delta, slope = (F.softplus(v), torch.sigmoid(v)) if dt_softplus else (v, None)
    if tuple(dt_limit) != (0.0, math.inf):
        inside = ((delta >= dt_limit[0]) & (delta <= dt_limit[1])).to(acc)
        delta = delta.clamp(min=dt_limit[0], max=dt_limit[1])
        slope = inside if slope is None else slope * inside
    return delta, slope


def _time_block(t: Tensor, s: int, e: int, T: int, acc) -> Tensor:
    """t[:, s:e] in ``acc`` (a view when it can be), zero-padded along time to T rows (padding: Δ = 0,
    x = B = C = 0: identity decay and no input, so the state after the padding is the state at e)."""
    piece = t[:, s:e].to(acc)
    if T != e - s:
        return F.pad(piece, [0, 0] * (t.dim() - 2) + [0, T - (e - s)])
    return piece


def _block_common(x, delta, A, B, C, Q, monotone):
    """What forward and backward share for one block of c = T / Q chunks (layouts in the module docstring)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    c = T // Q
    acs = (delta * A).view(b, c, Q, H).cumsum(2)  # (b, c, Q, H): log-decay from the chunk start, inclusive
    at = acs.transpose(2, 3).contiguous()  # (b, c, H, Q)
    # Lm[i, j] = exp(acs_i - acs_j): the decay from step j to step i (i >= j) within a chunk. Above the
    # diagonal it is 1 (clamped there, as acs is non-increasing when A <= 0 and Δ >= 0) or 0 (exact path);
    # the causal mask is applied once per group, on C B^T, instead of on every head's L.
    Lm = torch.sub(at.unsqueeze(-1), at.unsqueeze(-2))
    tril = _tril(Q, x.dtype, x.device)
    if monotone:
        Lm = _exp_(Lm, 0.0)
    else:  # some a > 0: mask exactly (the upper triangle may hold large positive values)
        Lm = Lm.masked_fill_(tril == 0, -math.inf).exp_()
    xd = torch.empty(b, T, H, P, dtype=x.dtype, device=x.device)
    torch.mul(x, delta.unsqueeze(-1), out=xd)
    xd = xd.view(b, c, Q, H, P)  # Δ x, time-major
    xdh = xd.permute(0, 1, 3, 2, 4).contiguous()  # (b, c, H, Q, P): per head, for the (Q x Q) matmuls
    Bv = B.view(b, c, Q, G, N).transpose(2, 3)  # (b, c, G, Q, N)
    Cv = C.view(b, c, Q, G, N).transpose(2, 3)
    CB = torch.matmul(Cv, Bv.transpose(-1, -2)).mul_(tril)  # (b, c, G, Q, Q), causal
    return acs, Lm, xd, xdh, Bv, Cv, CB


def _ssd_fwd_block(x, delta, A, B, C, hbuf, Q, y_out, monotone):
    """One block: y_out (b, T, H, P) <- SSM output (no D, no gate); hbuf (b, c+1, H, P, N) holds the state
    entering the block in slot 0 and receives the state entering every later chunk (slot c: after the block)."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    K, c = H // G, T // Q
    KP = K * P
    acs, Lm, xd, xdh, Bv, Cv, CB = _block_common(x, delta, A, B, C, Q, monotone)
    scores = Lm.view(b, c, G, K, Q, Q).mul_(CB.unsqueeze(3)).view(b, c, H, Q, Q)  # (C B^T) ∘ L
    y_in = torch.matmul(scores, xdh)  # (b, c, H, Q, P): within-chunk outputs
    end = acs[:, :, -1:]  # (b, c, 1, H)
    w = _exp_(end - acs)  # decay from each step to its chunk's end
    Xw = torch.mul(xd, w.unsqueeze(-1)).view(b, c, Q, G, KP)
    # each chunk's own state at its end, written where the state after the chunk goes, then the recurrence over
    # chunk states (cheap: H P N per chunk) adds the decayed state entering the chunk, in place
    torch.matmul(Xw.permute(0, 1, 3, 4, 2), Bv, out=hbuf[:, 1:].view(b, c, G, KP, N))
    decay = _exp_(end.squeeze(2).clone())[..., None, None]  # (b, c, H, 1, 1): the whole chunk's decay
    for ci in range(c):
        hbuf[:, ci + 1].addcmul_(decay[:, ci], hbuf[:, ci])
    y = torch.matmul(Cv, hbuf[:, :c].reshape(b, c, G, KP, N).transpose(-1, -2))  # (b, c, G, Q, KP)
    y = y.transpose(2, 3).reshape(b, c, Q, H, P)
    torch.addcmul(y_in.transpose(2, 3), y, _exp_(acs).unsqueeze(-1), out=y_out.view(b, c, Q, H, P))


def _ssd_bwd_block(x, delta, A, B, C, hbuf, gy, dh, Q, gy_y, monotone):
    """Gradients of one block from gy = dLoss/d(SSM output) (b, T, H, P) and dh = dLoss/d(state after the
    block); hbuf: the saved chunk states (b, c+1, H, P, N); gy_y: <gy, SSM output> over headdim (b, T, H)
    or None to recompute the output. Returns dx (SSM part), dΔ, dA, dB, dC, dLoss/d(state entering the
    block) and the SSM output (no D, no gate) when it was recomputed, else None."""
    b, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    K, c = H // G, T // Q
    KP = K * P
    acs, Lm, xd, xdh, Bv, Cv, CB = _block_common(x, delta, A, B, C, Q, monotone)
    scores = (Lm.view(b, c, G, K, Q, Q) * CB.unsqueeze(3)).view(b, c, H, Q, Q)
    end = acs[:, :, -1:]
    w = _exp_(end - acs)  # (b, c, Q, H)
    decay = _exp_(end.squeeze(2).clone())  # (b, c, H)
    E = _exp_(acs)  # (b, c, Q, H), in place: acs is not needed any more
    gyv = gy.view(b, c, Q, H, P)
    gyh = gyv.permute(0, 1, 3, 2, 4).contiguous()  # (b, c, H, Q, P)
    hin = hbuf[:, :c].reshape(b, c, G, KP, N)
    # y_inter = E ∘ (C hin^T): gradients for C and for the chunk states
    gyE = torch.mul(gyv, E.unsqueeze(-1)).view(b, c, Q, G, KP)
    dSb = torch.empty(b, c + 1, H, P, N, dtype=x.dtype, device=x.device)
    torch.matmul(gyE.permute(0, 1, 3, 4, 2), Cv, out=dSb[:, :c].view(b, c, G, KP, N))  # dLoss/dhin via y
    dC = torch.matmul(gyE.transpose(2, 3), hin)  # (b, c, G, Q, N)
    y = None
    if gy_y is None:
        y = torch.matmul(Cv, hin.transpose(-1, -2)).transpose(2, 3).reshape(b, c, Q, H, P).mul_(E.unsqueeze(-1))
        y = y.add_(torch.matmul(scores, xdh).transpose(2, 3)).view(b, T, H, P)
        gy_y = (gy * y).sum(-1)
    # reverse recurrence over the chunk states: dSb[:, k] <- dLoss/d(state entering chunk k)
    dSb[:, c].copy_(dh)
    dec5 = decay[..., None, None]
    for ci in reversed(range(c)):
        dSb[:, ci].addcmul_(dec5[:, ci], dSb[:, ci + 1])
    dS = dSb[:, 1:]  # dLoss/d(state leaving chunk k) = dLoss/d(S_k)
    # each chunk's own state S = (xd ∘ w)^T B
    dSv = dS.reshape(b, c, G, KP, N)
    Xw = torch.mul(xd, w.unsqueeze(-1)).view(b, c, Q, G, KP)
    dB = torch.matmul(Xw.transpose(2, 3), dSv)  # (b, c, G, Q, N)
    dxd = torch.matmul(Bv, dSv.transpose(-1, -2)).transpose(2, 3).reshape(b, c, Q, H, P).mul_(w.unsqueeze(-1))
    # within-chunk: y_in = ((C B^T) ∘ L) xd
    dxd += torch.matmul(scores.transpose(-1, -2), gyh).transpose(2, 3)
    dsc = torch.matmul(gyh, xdh.transpose(-1, -2))  # (b, c, H, Q, Q)
    dCB = dsc.mul_(Lm).view(b, c, G, K, Q, Q).sum(3).mul_(_tril(Q, x.dtype, x.device))
    dC += torch.matmul(dCB, Bv)
    dB += torch.matmul(dCB.transpose(-1, -2), Cv)
    # acs (log-decays from the chunk start): every factor exp(acs_i - acs_j) gives +g to i and -g to j, so
    # dacs_k = <gy_k, y_k> - <xd_k, dxd_k> (+ <dS, state leaving the chunk> at the chunk's last step)
    xdx = (dxd * x.view(b, c, Q, H, P)).sum(-1)  # (b, c, Q, H) = <x, dxd>
    dacs = gy_y.view(b, c, Q, H) - xdx * delta.view(b, c, Q, H)
    dacs[:, :, -1] += torch.einsum("bchk,bchk->bch", dS.reshape(b, c, H, P * N), hbuf[:, 1:].reshape(b, c, H, P * N))
    da = dacs.flip(2).cumsum(2).flip(2).reshape(b, T, H)  # acs = cumsum(a) within the chunk
    ddelta = xdx.view(b, T, H).addcmul_(da, A)
    dA = (da * delta).sum((0, 1))
    dx = dxd.view(b, T, H, P).mul_(delta.unsqueeze(-1))
    dB = dB.transpose(2, 3).reshape(b, T, G, N)
    dC = dC.transpose(2, 3).reshape(b, T, G, N)
    return dx, ddelta, dA, dB, dC, dSb[:, 0], y


def _monotone(delta: Tensor, A: Tensor) -> bool:
    """Whether every a = Δ A is <= 0 (Mamba-2: A = -exp(A_log), Δ = softplus(...)): the fast causal mask."""
    return bool((A <= 0).all()) and bool((delta >= 0).all())


def _blocks(L: int, Q: int, block: int) -> list[tuple[int, int]]:
    n = max(1, block // Q) * Q
    return [(s, min(s + n, L)) for s in range(0, L, n)]


class _SSDMatmul(torch.autograd.Function):
    """Chunked SSD (matmul form), blocks of chunks; backward recomputes each block from its saved states."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, h0, dt_softplus, dt_limit, Q, block):
        acc = acc_dtype(x)
        b, L, H, P = x.shape
        N = B.shape[3]
        dev = x.device
        delta, _ = _delta_and_slope(dt, dt_bias, dt_softplus, dt_limit, acc)
        Af = A.to(acc)
        monotone = _monotone(delta, Af)
        nch = -(-L // Q)
        save = any(ctx.needs_input_grad)
        hall = torch.empty(b, nch + 1, H, P, N, dtype=acc, device=dev) if save else None
        y = torch.empty(b, L, H, P, dtype=acc, device=dev)
        h = x.new_zeros(b, H, P, N, dtype=acc) if h0 is None else h0.to(acc)
        for s, e in _blocks(L, Q, block):
            T = -(-(e - s) // Q) * Q
            k = s // Q
            if save:
                hbuf = hall[:, k: k + T // Q + 1]
            else:
                hbuf = torch.empty(b, T // Q + 1, H, P, N, dtype=acc, device=dev)
            hbuf[:, 0].copy_(h)
            y_out = y[:, s:e] if T == e - s else torch.empty(b, T, H, P, dtype=acc, device=dev)
            _ssd_fwd_block(_time_block(x, s, e, T, acc), _time_block(delta, s, e, T, acc), Af,
                           _time_block(B, s, e, T, acc), _time_block(C, s, e, T, acc), hbuf, Q, y_out, monotone)
            if T != e - s:
                y[:, s:e] = y_out[:, : e - s]
            h = hbuf[:, T // Q]
        h = h.clone()  # owns its storage (not a view pinning the saved states)
        if D is not None:
            y.addcmul_(x, D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
        if z is not None:
            y.mul_(F.silu(z.to(acc)))
        out = y.to(x.dtype)
        # without a gate the SSM output is out - D x: keep it (usually alive anyway, as the next op's input)
        keep_out = save and z is None and x.dtype == acc
        if save:
            ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, h0, hall, out if keep_out else None)
        ctx.cfg = (dt_softplus, dt_limit, Q, block)
        return out, h

    @staticmethod
    def backward(ctx, gout, gh):
        x, dt, A, B, C, D, z, dt_bias, h0, hall, out = ctx.saved_tensors
        dt_softplus, dt_limit, Q, block = ctx.cfg
        acc = hall.dtype
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        dev = x.device
        delta, slope = _delta_and_slope(dt, dt_bias, dt_softplus, dt_limit, acc)
        Af = A.to(acc)
        monotone = _monotone(delta, Af)
        Dm = None if D is None else (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
        dh = x.new_zeros(b, H, P, N, dtype=acc) if gh is None else gh.to(acc)
        blocks = _blocks(L, Q, min(block, CPU_BWD_BLOCK))
        dx = torch.empty(b, L, H, P, dtype=acc, device=dev) if len(blocks) > 1 else None
        ddelta = torch.empty(b, L, H, dtype=acc, device=dev)
        dB = torch.empty(b, L, G, N, dtype=acc, device=dev)
        dC = torch.empty_like(dB)
        dz = torch.empty(b, L, H, P, dtype=acc, device=dev) if z is not None else None
        dA = torch.zeros(H, dtype=acc, device=dev)
        dD = None if D is None else torch.zeros(H, P if D.dim() == 2 else 1, dtype=acc, device=dev)
        for s, e in reversed(blocks):
            n = e - s
            T = -(-n // Q) * Q
            k = s // Q
            xs = x[:, s:e].to(acc)
            g = x.new_zeros(b, n, H, P, dtype=acc) if gout is None else gout[:, s:e].to(acc)
            gy_y = None  # <gy, SSM output>, from the saved output when there is no gate
            if z is not None:
                zs = z[:, s:e].to(acc)
                sz = torch.sigmoid(zs)
                gy = g * zs * sz  # through y * silu(z)
            else:
                gy = g
                if out is not None:
                    gy_y = (gy * out[:, s:e]).sum(-1)
            gx = None
            if Dm is not None and D.dim() == 1:
                gx = (gy * xs).sum(-1)  # (b, n, H)
                dD += gx.sum((0, 1))[:, None]
                if gy_y is not None:
                    gy_y -= gx * Dm[:, 0]
            elif Dm is not None:
                dD += (gy * xs).sum((0, 1))
                if gy_y is not None:
                    gy_y -= (gy * xs * Dm).sum(-1)
            dxb, ddb, dAb, dBb, dCb, dh, yb = _ssd_bwd_block(
                _time_block(xs, 0, n, T, acc), _time_block(delta, s, e, T, acc), Af,
                _time_block(B, s, e, T, acc), _time_block(C, s, e, T, acc), hall[:, k: k + T // Q + 1],
                _time_block(gy, 0, n, T, acc), dh, Q, None if gy_y is None else _time_block(gy_y, 0, n, T, acc),
                monotone)
            if z is not None:
                ypre = yb[:, :n] if Dm is None else yb[:, :n] + xs * Dm
                dz[:, s:e] = g * ypre * sz * (1 + zs * (1 - sz))
            dxs = dxb[:, :n]
            if Dm is not None:
                dxs = dxs.addcmul_(gy, Dm)
            if n == L:  # one block: no copy
                dx = dxs
            else:
                dx[:, s:e] = dxs
            ddelta[:, s:e] = ddb[:, :n]
            dB[:, s:e] = dBb[:, :n]
            dC[:, s:e] = dCb[:, :n]
            dA += dAb
        ddt = ddelta if slope is None else ddelta.mul_(slope)
        dbias = None if dt_bias is None else ddt.sum((0, 1))
        if D is not None and D.dim() == 1:
            dD = dD[:, 0]
        grads = (dx, ddt, dA, dB, dC, dD, dz, dbias, None if h0 is None else dh)
        ins = (x, dt, A, B, C, D, z, dt_bias, h0)
        grads = tuple(None if g is None or not need else g.to(t.dtype)
                      for g, t, need in zip(grads, ins, ctx.needs_input_grad))
        return (*grads, None, None, None, None)


def ssd_matmul(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = CPU_CHUNK,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    *,
    block_len: int = CPU_BLOCK,
):
    """SSD in the chunked matmul form with a hand-written backward (the CPU fast path for large d_state).

    ``mamba_chunk_scan_combined``'s arguments and results, no ``seq_idx``. ``chunk_size`` is the Q of the
    module docstring (the result does not depend on it); ``block_len`` tokens are processed at a time
    (backward: at most ``CPU_BWD_BLOCK``), which bounds the working set (cost per token flat in L). Saves
    its inputs and the state at every chunk boundary, (batch, nheads, L / Q, headdim, dstate), for backward;
    recomputes the rest.
    """
    check_ssd("ssd_matmul", x, dt, A, B, C, D, z, dt_bias, initial_states, None, chunk_size)
    y, h = _SSDMatmul.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, bool(dt_softplus),
                            (float(dt_limit[0]), float(dt_limit[1])), int(chunk_size), int(block_len))
    return (y, h) if return_final_states else y


def _resets(seq_idx: Tensor | None) -> Tensor | None:
    if seq_idx is None:
        return None
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int = 256,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    *,
    backend: str | None = None,
    piece_len: int | None = None,
):
    """Chunked SSD, drop-in for mamba_ssm's ``mamba_chunk_scan_combined``. Any L (no caller padding).

    ``backend`` as in ``selective_scan``. On CPU ("auto" / "cpu") the faster of two fast paths runs, picked
    by ``backend.ssd_cpu_impl`` from d_state and whether gradients are needed: ``ssd_matmul`` (the chunked
    form through BLAS, hand-written backward, chunk ``CPU_CHUNK`` whatever ``chunk_size`` says: the result
    does not depend on it) or the compiled Mamba-1 scan; with ``seq_idx`` or backend="ref" the autograd
    PyTorch path below runs (the reference twin of ``ssd_matmul``). That path processes the sequence in
    pieces of ``piece_len`` (a multiple of ``chunk_size``), each recomputed in backward, so backward memory
    does not grow with (L x chunk) activations.
    Returns out: (batch, L, nheads, headdim) in x's dtype [, final_states fp32].
    """
    check_ssd("ssd", x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    if x.device.type == "cpu" and seq_idx is None and (backend or os.environ.get(ENV_VAR) or "auto") in ("auto", "cpu"):
        training = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
        impl = ssd_cpu_impl(B.shape[3], x.shape[1], training)
        if impl == "scan" and resolve_backend(backend, x.device) == "ref":
            impl = "matmul"  # the compiled scan cannot load here (one warning said why): the matmul form needs none
        if impl == "matmul":
            return ssd_matmul(x, dt, A, B, C, CPU_CHUNK, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                              dt_softplus=dt_softplus, dt_limit=dt_limit, return_final_states=return_final_states)
    kernel = fast_path(backend, x.device, "mamba_chunk_scan_combined")
    if kernel is not None and seq_idx is not None and not getattr(kernel, "supports_seq_idx", True):
        kernel = None  # the CPU kernel (the compiled scan) has no resets: packed sequences take this path
    if kernel is not None:  # Triton SSD (forward + backward) or, on CPU, the compiled selective scan
        return kernel(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                      seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=tuple(dt_limit),
                      return_final_states=return_final_states)
    b, L, H, P = x.shape
    N = B.shape[3]
    acc = acc_dtype(x)
    h0 = x.new_zeros(b, H, P, N, dtype=acc) if initial_states is None else initial_states.to(acc)
    if piece_len is None:  # keep one piece's (T x T) decay and (P x N) states around 16M elements
        per_token = H * (chunk_size + P * N // chunk_size + P)
        piece_len = max(1, (1 << 24) // max(b * per_token, 1) // chunk_size) * chunk_size
    piece_len = max(chunk_size, piece_len // chunk_size * chunk_size)

    def step(seq, params, h):
        x_, dt_, B_, C_, z_, reset_ = seq
        A_, D_, bias_ = params
        return _ssd_piece(x_, dt_, A_, B_, C_, D_, z_, bias_, reset_, h,
                          chunk_size=chunk_size, dt_softplus=dt_softplus, dt_limit=dt_limit)

    y, last = chunked_recurrence(
        step,
        seq=[(x, 1), (dt, 1), (B, 1), (C, 1), (z, 1), (_resets(seq_idx), 1)],
        params=[A, D, dt_bias],
        h0=h0,
        length=L,
        chunk_len=min(piece_len, L + (-L) % chunk_size),
        out_dim=1,
    )
    y = y.to(x.dtype)
    return (y, last) if return_final_states else y


def ssd_ref(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
    dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
):
    """Reference twin: the token-by-token recurrence (slow; for tests)."""
    check_ssd("ssd", x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size=1)
    b, L, H, P = x.shape
    N = B.shape[3]
    acc = acc_dtype(x)
    dt = _process_dt(dt, dt_bias, dt_softplus, dt_limit)
    A3 = A.to(acc)[:, None, None].expand(H, P, N)
    h = x.new_zeros(b, H, P, N, dtype=acc) if initial_states is None else initial_states.to(acc)
    reset = _resets(seq_idx)
    ys = []
    for t in range(L):
        if reset is not None:
            h = h * (~reset[:, t]).to(acc)[:, None, None, None]
        y, h = selective_state_update_ref(h, x[:, t], dt[:, t, :, None].expand(b, H, P), A3, B[:, t], C[:, t])
        ys.append(y.to(acc))
    y = _skip_and_gate(torch.stack(ys, dim=1), x, D, z).to(x.dtype)
    return (y, h) if return_final_states else y
