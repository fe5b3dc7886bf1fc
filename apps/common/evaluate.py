"""Exact log-likelihood of sequences of any length: read in pieces, the state carried across."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sequence_nll", "bits_per_token"]


@torch.no_grad()
def sequence_nll(model, tokens: Tensor, chunk_len: int = 65536, vocab_size: int | None = None,
                 state=None) -> Tensor:
    """Per-token negative log-likelihood (nats) of ``tokens[1:]`` given what precedes each.

    tokens: (L,) or (batch, L) token ids; returns (L - 1,) or (batch, L - 1) float32. The first token is
    context only; ``state`` is a state after an earlier prefix that ends just before tokens[0].
    Memory is one piece's activations whatever L is.
    """
    squeeze = tokens.ndim == 1
    ids = tokens.unsqueeze(0) if squeeze else tokens
    was_training = model.training
    model.eval()
    pieces = []
    try:
        for s in range(0, ids.shape[1] - 1, chunk_len):
            x = ids[:, s : min(s + chunk_len, ids.shape[1] - 1)]
            y = ids[:, s + 1 : s + 1 + x.shape[1]]
            out = model(x, state=state, return_state=True)
            state = out.state
            logits = out.logits[..., :vocab_size] if vocab_size else out.logits
            pieces.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none"))
    finally:
        model.train(was_training)
    nll = torch.cat(pieces, dim=1) if pieces else ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)
    return nll[0] if squeeze else nll


def bits_per_token(model, tokens: Tensor, chunk_len: int = 65536, vocab_size: int | None = None) -> float:
    """Mean bits per predicted token over ``tokens[1:]`` (see sequence_nll)."""
    nll = sequence_nll(model, tokens, chunk_len, vocab_size)
    return float(nll.mean()) / math.log(2)
