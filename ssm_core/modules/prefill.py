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


def prefill_in_pieces(mixer: nn.Module, u: Tensor) -> bool:
    """Whether ``mixer`` (Mamba / Mamba2: ``PREFILL_PIECE``, ``in_proj``, delta hooks) should read ``u``
    (batch, L, d) in pieces: a CPU forward longer than a piece, without an autograd graph, and with no delta hook
    registered (hooks read a whole call's Δ: one call per layer, as experiments.synthetic's analyses expect)."""
    return (u.shape[1] > mixer.PREFILL_PIECE and u.device.type == "cpu" and not mixer.has_delta_hooks
            and not (torch.is_grad_enabled() and (u.requires_grad or mixer.in_proj.weight.requires_grad)))


def run_in_pieces(step: Callable[[Tensor, SSMState], tuple[Tensor, SSMState]], u: Tensor, state: SSMState,
                  piece: int, d_out: int) -> tuple[Tensor, SSMState]:
    """``step(u_piece, state) -> (out_piece, state)`` over consecutive pieces of ``u`` -> (out, final state)."""
    out = u.new_empty(u.shape[0], u.shape[1], d_out)
    for s in range(0, u.shape[1], piece):
        out[:, s: s + piece], state = step(u[:, s: s + piece], state)
    return out, state
