"""RMSNorm and gated RMSNorm (Mamba-2's output norm), computed in fp32.

On CPU both take the compiled kernel (``kernels.cpu.rms_norm_gated_cpu``: one pass forward, one backward,
deterministic at any thread count) through ``backend.fast_path``; elsewhere, and with ``HISS_BACKEND=ref``,
they are the PyTorch code below (``_GatedRMSNorm``: a hand-written backward; ``rms_norm``: autograd). Their twin
``rms_norm_ref`` is the textbook definition, float64, one group at a time, that both paths are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backend import fast_path

__all__ = ["rms_norm", "rms_norm_ref", "rms_norm_gated", "RMSNorm", "RMSNormGated"]


def rms_norm(x: Tensor, weight: Tensor | None, eps: float = 1e-5, group_size: int | None = None) -> Tensor:
    """x / rms(x) * weight over the last axis, or over groups of ``group_size`` channels."""
    kernel = fast_path(None, x.device, "rms_norm_gated")
    if kernel is not None:
        return kernel(x, None, weight, eps, group_size)
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
    if not norm_before_gate and (x.dtype == torch.float64) == (z.dtype == torch.float64):
        size = x.shape[-1] if group_size is None else group_size
        if x.shape[-1] % size:
            raise ValueError(f"rms_norm: group_size {size} does not divide {x.shape[-1]} channels")
        kernel = fast_path(None, x.device, "rms_norm_gated")
        if kernel is not None and z.device == x.device:
            return kernel(x, z, weight, eps, size)
        return _GatedRMSNorm.apply(x, z, weight, eps, size)
    gate = F.silu(z.to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    if norm_before_gate:
        return (rms_norm(x, weight, eps, group_size) * gate).to(x.dtype)
    return rms_norm((x.to(gate.dtype) * gate), weight, eps, group_size).to(x.dtype)


class _GatedRMSNorm(torch.autograd.Function):
    """norm(x * silu(z)) * weight over groups of ``size`` channels, fp32 (fp64 for fp64 x), with a
    hand-written backward: about half of autograd's passes over (..., C), run ``ROWS`` rows at a time so
    that the temporaries stay in cache. Saves x, z and the per-group 1 / rms; recomputes silu(z)."""

    ROWS = 64

    @staticmethod
    def forward(ctx, x, z, weight, eps, size):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, zf = x.to(acc), z.to(acc)
        h = F.silu(zf).mul_(xf)  # the gated input, (..., C)
        hg = h.unflatten(-1, (-1, size))
        r = torch.rsqrt(torch.linalg.vector_norm(hg, dim=-1, keepdim=True).pow_(2).div_(size).add_(eps))
        out = hg.mul_(r).flatten(-2)  # in place: h is not needed any more
        if weight is not None:
            out = out.mul_(weight.to(acc))
        ctx.save_for_backward(x, z, weight, r)
        ctx.size = size
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        x, z, weight, r = ctx.saved_tensors
        size, acc = ctx.size, r.dtype
        C = x.shape[-1]
        need_x, need_z, need_w = ctx.needs_input_grad[:3]
        xs, zs, gs = x.reshape(-1, C), z.reshape(-1, C), gout.reshape(-1, C)
        rs = r.reshape(-1, C // size, 1)
        n = xs.shape[0]
        w = None if weight is None else weight.to(acc)
        dx = torch.empty(n, C, dtype=x.dtype, device=x.device) if need_x else None
        dz = torch.empty(n, C, dtype=z.dtype, device=z.device) if need_z else None
        dw = torch.zeros(C, dtype=acc, device=x.device) if (w is not None and need_w) else None
        for s in range(0, n, _GatedRMSNorm.ROWS):
            e = min(s + _GatedRMSNorm.ROWS, n)
            xf, zf, go, rr = xs[s:e].to(acc), zs[s:e].to(acc), gs[s:e].to(acc), rs[s:e]
            sig = torch.sigmoid(zf)
            g = zf * sig  # silu(z)
            xhat = torch.mul(xf, g).unflatten(-1, (-1, size)).mul_(rr).flatten(-2)  # normalised gated input
            if dw is not None:
                dw += torch.mul(go, xhat).sum(0)
            if w is not None:
                go = go * w
            gg = go.unflatten(-1, (-1, size))
            proj = (gg * xhat.unflatten(-1, (-1, size))).sum(-1, keepdim=True).div_(-size)
            # dLoss/d(x * silu(z)) = r (go - xhat <go, xhat> / size)
            dh = xhat.unflatten(-1, (-1, size)).mul_(proj).add_(gg).mul_(rr).flatten(-2)
            if dx is not None:
                if dx.dtype == acc:
                    torch.mul(dh, g, out=dx[s:e])
                else:
                    dx[s:e] = dh * g
            if dz is not None:  # d silu(z) / dz = sig (1 + z (1 - sig)) = sig + g - g sig
                dsilu = torch.addcmul(g, g, sig, value=-1).add_(sig)
                if dz.dtype == acc:
                    torch.mul(dh.mul_(xf), dsilu, out=dz[s:e])
                else:
                    dz[s:e] = dh.mul_(xf).mul_(dsilu)
        return (None if dx is None else dx.view(x.shape), None if dz is None else dz.view(z.shape),
                None if dw is None else dw.to(weight.dtype), None, None)


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
