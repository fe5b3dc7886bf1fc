"""Training on sequences longer than memory allows: the sequence is cut into pieces, each piece continues
from the previous piece's state, and (with ``recompute=True``) each piece's activations are rebuilt in
backward instead of kept. Gradients are exact (they flow through the carried state) unless
``detach_state=True`` asks for truncated BPTT. Memory is one piece's activations plus one small state
per piece, so L = 2^20 trains where a one-shot forward would need tens of GB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..state import ModelState

__all__ = ["ChunkedLoss", "chunked_lm_loss"]


@dataclass
class ChunkedLoss:
    loss_sum: Tensor  # summed token losses (differentiable)
    n_tokens: int  # tokens that counted (labels != ignore_index)
    state: ModelState | None  # state after the last piece

    @property
    def loss(self) -> Tensor:
        return self.loss_sum / max(self.n_tokens, 1)


def _piece_loss(model, ids: Tensor, labels: Tensor, state: ModelState | None, vocab_size: int | None,
                ignore_index: int):
    out = model(ids, state=state, return_state=True)
    logits = out.logits if vocab_size is None else out.logits[..., :vocab_size]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index,
                           reduction="sum")
    return loss, out.state


def chunked_lm_loss(model, input_ids: Tensor, labels: Tensor, chunk_len: int, state: ModelState | None = None,
                    recompute: bool = True, detach_state: bool = False, vocab_size: int | None = None,
                    ignore_index: int = -100) -> ChunkedLoss:
    """Summed cross-entropy of a causal LM over a long sequence, read ``chunk_len`` tokens at a time.

    model: a MambaLMHeadModel (anything taking ``(ids, state=, return_state=True)`` and returning
    ``.logits`` / ``.state``). input_ids, labels: (batch, L); labels already shifted (labels[:, t] is the
    target of input_ids[:, t]). vocab_size: score only the first ``vocab_size`` logits (the head is padded).
    ``chunk_len`` must be a multiple of a Mamba-2 model's chunk_size for results identical to one shot.
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"chunked_lm_loss: input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
                         "must have the same shape")
    if chunk_len <= 0:
        raise ValueError(f"chunked_lm_loss: chunk_len must be positive, got {chunk_len}")
    total = 0.0
    use_checkpoint = recompute and torch.is_grad_enabled()
    for s in range(0, input_ids.shape[1], chunk_len):
        ids, lab = input_ids[:, s : s + chunk_len], labels[:, s : s + chunk_len]
        if detach_state and state is not None:
            state = state.detach()
        if use_checkpoint:
            loss, state = checkpoint(_piece_loss, model, ids, lab, state, vocab_size, ignore_index,
                                     use_reentrant=False)
        else:
            loss, state = _piece_loss(model, ids, lab, state, vocab_size, ignore_index)
        total = total + loss
    return ChunkedLoss(total, int((labels != ignore_index).sum()), state)
