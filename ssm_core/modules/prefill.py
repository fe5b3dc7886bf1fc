"""Long CPU prefill in pieces: a mixer's no-grad forward over L tokens as L / piece calls with the state carried.

The result is the same (the state is exact), and every intermediate stays piece-sized, so the cost per token does
not grow with L: whole-sequence tensors cost page faults and cache misses on CPU (Mamba-1 1.9x, Mamba-2 1.4x per
token at 32k against 1k before; docs/benchmarks.md, prefill_flat).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..state import SSMState


def prefill_in_pieces(u: Tensor, weight: nn.Parameter, piece: int) -> bool:
    """Whether ``u`` (batch, L, d) is a long CPU forward without an autograd graph (the case for pieces)."""
    return (u.shape[1] > piece and u.device.type == "cpu"
            and not (torch.is_grad_enabled() and (u.requires_grad or weight.requires_grad)))


def run_in_pieces(step: Callable[[Tensor, SSMState], tuple[Tensor, SSMState]], u: Tensor, state: SSMState,
                  piece: int, d_out: int) -> tuple[Tensor, SSMState]:
    """``step(u_piece, state) -> (out_piece, state)`` over consecutive pieces of ``u`` -> (out, final state)."""
    out = u.new_empty(u.shape[0], u.shape[1], d_out)
    for s in range(0, u.shape[1], piece):
        out[:, s: s + piece], state = step(u[:, s: s + piece], state)
    return out, state
