"""Gated MLP (SwiGLU) as in mamba_ssm's ``GatedMLP`` (parameter names fc1, fc2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class GatedMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 bias: bool = False, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        out_features = out_features or in_features
        hidden = hidden_features if hidden_features is not None else int(8 * in_features / 3)
        hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(in_features, 2 * hidden, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(y * F.silu(gate))
