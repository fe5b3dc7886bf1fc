"""RMSNorm and gated RMSNorm (Mamba-2's output norm), computed in fp32.

No fast path: ``rms_norm`` and ``rms_norm_gated`` are this PyTorch code on every backend (they are a few
elementwise ops and one reduction; ``backend.KERNELS`` has no entry for them). Their twin ``rms_norm_ref``
is the textbook definition, float64, one group at a time, that ``rms_norm`` is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_gated", "RMSNorm", "RMSNormGated"]


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-5, group_size: int | None = None) -> Tensor:
    """x / rms(x) * weight over the last axis, or over groups of ``group_size`` channels."""
    dtype = x.dtype
    h = x.float() if x.dtype != torch.float64 else x
    if group_size is not None and group_size != h.shape[-1]:
        if h.shape[-1] % group_size:
            raise ValueError(f"rms_norm: group_size {group_size} does not divide {h.shape[-1]} channels")
        g = h.unflatten(-1, (-1, group_size))
        h = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2)
    else:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        h = h * weight.to(h.dtype)
    return h.to(dtype)


def rms_norm_ref(x: Tensor, weight: Tensor | None, eps: float = 1e-5, group_size: int | None = None) -> Tensor:
    """Reference twin of ``rms_norm``: y = x / sqrt(mean(x^2) + eps) * weight over each group of ``group_size``
    channels of the last axis (default: all of them), in float64, returned in x's dtype. x: (..., C)."""
    size = x.shape[-1] if group_size is None else group_size
    if x.shape[-1] % size:
        raise ValueError(f"rms_norm_ref: group_size {size} does not divide {x.shape[-1]} channels")
    groups = [g / torch.sqrt((g * g).mean(-1, keepdim=True) + eps) for g in x.double().split(size, dim=-1)]
    y = torch.cat(groups, dim=-1)
    if weight is not None:
        y = y * weight.double()
    return y.to(x.dtype)


def rms_norm_gated(
    x: Tensor, z: Tensor | None, weight: Tensor | None, eps: float = 1e-5,
    group_size: int | None = None, norm_before_gate: bool = False,
) -> Tensor:
    """Mamba-2 gate: norm(x * silu(z)) (default) or norm(x) * silu(z) with ``norm_before_gate``."""
    if z is None:
        return rms_norm(x, weight, eps, group_size)
    gate = F.silu(z.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    if norm_before_gate:
        return (rms_norm(x, weight, eps, group_size) * gate).to(x.dtype)
    return rms_norm((x.to(gate.dtype) * gate), weight, eps, group_size).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class RMSNormGated(nn.Module):
    """mamba_ssm's RMSNormGated: ``forward(x, z)`` with optional per-group normalisation."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return rms_norm_gated(x, z, self.weight, self.eps, self.group_size, self.norm_before_gate)
