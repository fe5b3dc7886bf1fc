"""Mamba-2 state-space duality (SSD): chunked scan and its reference twin.

Per head h (scalar A_h < 0), channel p of headdim, state n; Δ = clamp(softplus(dt + dt_bias)):

    h_t = exp(Δ_t A_h) h_{t-1} + Δ_t x_t B_t^T,     y_t = h_t C_t + D x_t,   y_t *= silu(z_t)

Layouts follow mamba_ssm's ``mamba_chunk_scan_combined``:
    x, z: (batch, L, nheads, headdim);  dt: (batch, L, nheads);  A, dt_bias: (nheads,)
    B, C: (batch, L, ngroups, dstate);  D: (nheads,) or (nheads, headdim)
    initial_states / final_states: (batch, nheads, headdim, dstate) fp32;  seq_idx: (batch, L) int.

Packed sequences (``seq_idx``) are handled by setting the decay to exp(-inf) = 0 where a new
sequence starts, which is exactly a state reset. The within-chunk algebra never subtracts
cumulative sums, so those -inf stay harmless.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.shape_checks import check_ssd  # pure Python: the same shape rules as the fast paths

from .backend import fast_path
from .chunked import chunked_recurrence
from .selective_scan import acc_dtype, selective_state_update_ref

__all__ = ["mamba_chunk_scan_combined", "ssd_ref", "segsum"]


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

    ``backend`` as in ``selective_scan`` (on CPU the fast path is the compiled Mamba-1 scan, which
    measured faster than these einsums; with ``seq_idx`` this PyTorch code runs). The PyTorch path
    processes the sequence in pieces of ``piece_len`` (a multiple of ``chunk_size``), each recomputed in
    backward, so backward memory does not grow with (L x chunk) activations.
    Returns out: (batch, L, nheads, headdim) in x's dtype [, final_states fp32].
    """
    check_ssd("ssd", x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
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
