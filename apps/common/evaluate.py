"""Read a sequence of any length in pieces with the recurrent state carried across: the one way every app
prefills a prompt and scores held-out data exactly, in the memory of one piece.

``read_pieces`` is the loop; ``prefill`` keeps only the final state; ``sequence_nll`` scores every token. A
piece boundary changes nothing: the state (a key/value cache for attention layers) carries all that came before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["read_pieces", "prefill", "sequence_nll", "bits_per_token"]


def read_pieces(model, ids: Tensor, chunk_len: int, state=None, num_last_tokens: int = 0, progress=None
                ) -> Iterator[tuple[int, object]]:
    """Yield ``(start, output)`` for consecutive pieces ``ids[:, start:start + chunk_len]`` of ids (batch, L), each
    run from the state the previous piece left (``output.state``). ``num_last_tokens`` is passed to the model
    (0: logits for every position). ``progress``: anything with ``update(n)`` (a tqdm bar), advanced per piece."""
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    for s in range(0, ids.shape[1], chunk_len):
        piece = ids[:, s: s + chunk_len]
        out = model(piece, state=state, return_state=True, num_last_tokens=num_last_tokens)
        state = out.state
        if progress is not None:
            progress.update(piece.shape[1])
        yield s, out


@torch.no_grad()  # not inference_mode: the state may later feed a forward that autograd tracks
def prefill(model, tokens: Tensor, state=None, chunk_len: int = 8192):
    """Read tokens (L,) or (batch, L) into the state, ``chunk_len`` at a time; returns the state after them."""
    ids = tokens.reshape(1, -1) if tokens.ndim == 1 else tokens
    if state is None and ids.shape[1] == 0:
        raise ValueError("prefill: nothing to read")
    for _, out in read_pieces(model, ids, chunk_len, state, num_last_tokens=1):
        state = out.state
    return state


@torch.no_grad()
def sequence_nll(model, tokens: Tensor, chunk_len: int = 65536, vocab_size: int | None = None, state=None,
                 return_state: bool = False, progress=None):
    """Per-token negative log-likelihood (nats) of ``tokens[1:]`` given what precedes each.

    tokens: (L,) or (batch, L) token ids; returns (L - 1,) or (batch, L - 1) float32 [, the state after
    tokens[:-1], i.e. just before the last token: where a following segment that starts at that token
    continues]. The first token is context only; ``state`` is a state after an earlier prefix that ends just
    before tokens[0]. Memory is one piece's activations whatever L is.
    """
    squeeze = tokens.ndim == 1
    ids = tokens.unsqueeze(0) if squeeze else tokens
    was_training = model.training
    model.eval()
    pieces = []
    try:
        inputs = ids[:, :-1]
        for s, out in read_pieces(model, inputs, chunk_len, state, progress=progress):
            state = out.state
            y = ids[:, s + 1: s + 1 + out.logits.shape[1]]
            logits = out.logits[..., :vocab_size] if vocab_size else out.logits
            pieces.append(F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none"))
    finally:
        model.train(was_training)
    nll = torch.cat(pieces, dim=1) if pieces else ids.new_zeros((ids.shape[0], 0), dtype=torch.float32)
    nll = nll[0] if squeeze else nll
    return (nll, state) if return_state else nll


def bits_per_token(model, tokens: Tensor, chunk_len: int = 65536, vocab_size: int | None = None) -> float:
    """Mean bits per predicted token over ``tokens[1:]`` (see sequence_nll)."""
    nll = sequence_nll(model, tokens, chunk_len, vocab_size)
    return float(nll.mean()) / math.log(2)
