"""Bidirectional wrapper (Vision Mamba, BiMamba / Caduceus): run a causal mixer forwards and over
the reversed sequence, and merge. Not causal, so it has no streaming state."""

from __future__ import annotations

import torch
from torch import Tensor, nn

MERGES = ("add", "mean", "concat")


def reverse_padded(x: Tensor, lengths: Tensor | None) -> Tensor:
    """Reverse each row's first ``lengths[b]`` positions along dim 1; padding stays in place."""
    if lengths is None:
        return x.flip(1)
    L = x.shape[1]
    t = torch.arange(L, device=x.device)[None, :]
    idx = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, idx[..., None].expand_as(x))


class Bidirectional(nn.Module):
    """y = merge(mixer(x), reverse(mixer_rev(reverse(x)))).

    mixer_rev=None shares all weights between the directions. merge: "add", "mean", or "concat"
    (then a ``merge_proj`` Linear maps 2*d_model back to d_model). ``lengths`` (batch,) handles
    right-padded variable-length batches: each row is reversed within its own length.
    """

    def __init__(self, mixer: nn.Module, mixer_rev: nn.Module | None = None, merge: str = "add",
                 d_model: int | None = None, device=None, dtype=None):
        super().__init__()
        if merge not in MERGES:
            raise ValueError(f"Bidirectional: merge must be one of {MERGES}, got {merge!r}")
        self.mixer, self.mixer_rev, self.merge = mixer, mixer_rev, merge
        if merge == "concat":
            d_model = d_model or getattr(mixer, "d_model", None)
            if d_model is None:
                raise ValueError("Bidirectional: merge='concat' needs d_model")
            self.merge_proj = nn.Linear(2 * d_model, d_model, bias=False, device=device, dtype=dtype)

    @property
    def weight_tie(self) -> bool:
        return self.mixer_rev is None

    def forward(self, x: Tensor, state=None, return_state: bool = False, lengths: Tensor | None = None):
        """x: (batch, L, d_model) -> (batch, L, d_model)."""
        if state is not None or return_state:
            raise ValueError("Bidirectional mixers see the whole sequence and have no streaming state")
        fwd = self.mixer(x)
        rev_mixer = self.mixer if self.mixer_rev is None else self.mixer_rev
        bwd = reverse_padded(rev_mixer(reverse_padded(x, lengths)), lengths)
        if self.merge == "add":
            return fwd + bwd
        if self.merge == "mean":
            return (fwd + bwd) / 2
        return self.merge_proj(torch.cat([fwd, bwd], dim=-1))
