"""Shared by the SSD tests (test_ops.py, test_ssd_chunked_cpu.py): the token-by-token fp64 recurrence."""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def naive_ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None, dt_softplus=True,
              dt_limit=(0.0, math.inf)):
    """Mamba-2's SSD as the recurrence in fp64, step by step: x, z (batch, L, H, P); dt (batch, L, H); A, dt_bias
    (H,); B, C (batch, L, G, N); D (H,) | (H, P); seq_idx (batch, L) resets the state where it changes. Δ is
    clamped only when dt_limit is given, as the ops do. Returns (y, final state (batch, H, P, N))."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, L, H, P = x.shape
    G, N = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = torch.nn.functional.softplus(dt)
    if tuple(dt_limit) != (0.0, math.inf):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    group = torch.arange(H) // (H // G)  # head -> its B/C group
    Bh, Ch = B[:, :, group], C[:, :, group]  # (b, L, H, N)
    h = torch.zeros(b, H, P, N, dtype=F64) if initial_states is None else initial_states.double()
    ys = []
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)  # (b, H)
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None]
        h = decay[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if D is not None:
        y = y + x * (D.double()[:, None] if D.dim() == 1 else D.double())
    if z is not None:
        y = y * torch.nn.functional.silu(z.double())
    return y, h
