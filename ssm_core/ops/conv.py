"""Depthwise causal conv1d with carried state (the short convolution in every Mamba block).

Layouts follow mamba_ssm's causal_conv1d: x: (batch, dim, L); weight: (dim, width); bias: (dim,);
conv state: (batch, dim, width - 1), the last ``width - 1`` inputs seen (zeros at the start).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.shape_checks import (  # pure Python: the fast paths' shape rules
    check_conv,
    check_conv_update,
    pad_time_major,
)

from .backend import fast_path

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_time_major", "causal_conv1d_update",
           "causal_conv1d_update_ref"]


def _activate(x: Tensor, activation: str | None) -> Tensor:
    return F.silu(x) if activation else x


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
    *,
    backend: str | None = None,
):
    """out[t] = act(bias + sum_k weight[:, k] * x[t - (width - 1) + k]), inputs before 0 from the state.

    seq_idx: (batch, L) int, packed sequences; taps never cross from one sequence id into another.
    Returns out: (batch, dim, L) and, with ``return_final_states``, (batch, dim, width - 1).
    ``backend`` as in ``selective_scan``; the PyTorch path is ``causal_conv1d_ref``.
    """
    check_conv("causal_conv1d", x, weight, bias, seq_idx, initial_states, activation)
    kernel = fast_path(backend, x.device, "causal_conv1d")
    if kernel is not None:
        return kernel(x, weight, bias, seq_idx=seq_idx, initial_states=initial_states,
                      return_final_states=return_final_states, activation=activation)
    return causal_conv1d_ref(x, weight, bias, seq_idx, initial_states, return_final_states, activation)


class _CausalConv1dTimeMajor(torch.autograd.Function):
    """The conv on time-major x (batch, L, dim): every tap is a shifted row range, so each pass is a contiguous
    multiply-add over (rows, dim); hand-written backward. Saves the padded input, the output and (with silu)
    the sigmoid of the pre-activation: silu'(p) = sig + silu(p) (1 - sig) needs no exp in backward."""

    ROWS = 128  # backward works on this many time steps at a time (its temporaries stay in cache)

    @staticmethod
    def forward(ctx, x, weight, bias, init, silu):
        L, W = x.shape[1], weight.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xp, final = pad_time_major(x, init, W, acc)  # (batch, W - 1 + L, dim): the state's inputs, then x
        wt = weight.detach().to(acc).t().contiguous()  # (W, dim): tap k's weights, a contiguous row
        if bias is None:
            pre = torch.mul(xp[:, W - 1:], wt[W - 1])
        else:
            pre = torch.addcmul(bias.detach().to(acc), xp[:, W - 1:], wt[W - 1])
        for k in range(W - 1):
            pre.addcmul_(xp[:, k: k + L], wt[k])
        sig = None
        if silu:
            sig = torch.sigmoid(pre)
            pre.mul_(sig)
        out = pre.to(x.dtype)
        ctx.save_for_backward(xp, wt, sig, pre if silu else None)
        ctx.meta = (x.dtype, weight.dtype, None if bias is None else bias.dtype, None if init is None else init.dtype)
        ctx.set_materialize_grads(False)
        return out, final

    @staticmethod
    def backward(ctx, gout, gfinal):
        xp, wt, sig, act = ctx.saved_tensors
        tx, tw, tb, ti = ctx.meta
        W, d = wt.shape
        b, L = xp.shape[0], xp.shape[1] - (W - 1)
        acc = xp.dtype
        dxp = xp.new_zeros(b, L + W - 1, d)
        dwt = xp.new_zeros(W, d)
        db = xp.new_zeros(d) if tb is not None else None
        if gout is not None:
            R = min(_CausalConv1dTimeMajor.ROWS, L)
            wacc = xp.new_zeros(W, b, R, d)  # per-tap products, summed over time once at the end
            for s in range(0, L, R):
                e = min(s + R, L)
                n = e - s
                g = gout[:, s:e].to(acc)
                if sig is not None:  # d silu(p) / dp = sig + silu(p) (1 - sig)
                    sg, a = sig[:, s:e], act[:, s:e]
                    g = torch.addcmul(a, a, sg, value=-1).add_(sg).mul_(g)
                for k in range(W):  # out[t] += w_k xp[t + k]
                    dxp[:, s + k: e + k].addcmul_(g, wt[k])
                    wacc[k, :, :n].addcmul_(g, xp[:, s + k: e + k])
                if db is not None:
                    db += g.sum((0, 1))
            dwt = wacc.sum((1, 2))
        if gfinal is not None:
            dxp[:, L:] += gfinal.transpose(1, 2).to(acc)
        need = ctx.needs_input_grad
        return (dxp[:, W - 1:].to(tx) if need[0] else None,
                dwt.t().to(tw) if need[1] else None,
                db.to(tb) if db is not None and need[2] else None,
                dxp[:, : W - 1].transpose(1, 2).to(ti) if ti is not None and need[3] else None,
                None)


def causal_conv1d_time_major(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``causal_conv1d`` on time-major x: (batch, L, dim) (any strides with a unit channel stride, e.g. a slice
    of in_proj's output) -> (out (batch, L, dim), final state (batch, dim, width - 1)); weight, bias,
    initial_states as in ``causal_conv1d``; no seq_idx. It saves the two layout copies that the channel-major
    kernel needs around a time-major model. Differentiable in every input and through the final state;
    computes in fp32 (fp64 for fp64 x). On CPU the compiled kernel (``kernels.cpu``); elsewhere, or with
    ``backend="ref"``, PyTorch ops with a hand-written backward (``_CausalConv1dTimeMajor``).
    Twin: ``causal_conv1d_ref`` on the transposed input."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d_time_major: x must be (batch, L, dim), got shape {tuple(x.shape)}")
    check_conv("causal_conv1d_time_major", x.transpose(1, 2), weight, bias, None, initial_states, activation)
    kernel = fast_path(backend, x.device, "causal_conv1d_time_major")
    if kernel is not None:
        return kernel(x, weight, bias, initial_states, activation)
    return _CausalConv1dTimeMajor.apply(x, weight, bias, initial_states, activation is not None)


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    seq_idx: Tensor | None = None,
    initial_states: Tensor | None = None,
    return_final_states: bool = False,
    activation: str | None = None,
):
    """Reference twin of ``causal_conv1d``: the PyTorch path (F.conv1d; masked windows with seq_idx), on any
    device and whatever $HISS_BACKEND says. Same arguments and returns; differentiable in every input."""
    check_conv("causal_conv1d_ref", x, weight, bias, seq_idx, initial_states, activation)
    batch, dim, _ = x.shape
    width = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros(batch, dim, width - 1)
    xp = torch.cat([initial_states.to(x.dtype), x], dim=-1)
    if seq_idx is None:
        out = F.conv1d(xp, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype), groups=dim)
    else:
        windows = xp.unfold(-1, width, 1)  # (batch, dim, L, width): windows[..., t, k] = xp[t + k]
        ids = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=-1).unfold(-1, width, 1)
        same = (ids == seq_idx.unsqueeze(-1)).unsqueeze(1)  # (batch, 1, L, width)
        out = (windows * same * weight.to(x.dtype)[:, None, :]).sum(-1)
        if bias is not None:
            out = out + bias.to(x.dtype)[:, None]
    out = _activate(out, activation)
    if return_final_states:
        # clone: a view of xp would pin the whole (batch, dim, L) input while the state is carried
        return out, xp[..., xp.shape[-1] - (width - 1) :].clone()
    return out


def causal_conv1d_update_ref(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference twin of ``causal_conv1d_update``, functional: x (batch, dim), conv_state (batch, dim, S >=
    width - 1) -> (out (batch, dim), new_state (batch, dim, S): shifted by one, x appended). Never in place."""
    check_conv_update("causal_conv1d_update_ref", x, conv_state, weight, bias, activation)
    width = weight.shape[1]
    window = torch.cat([conv_state[..., conv_state.shape[-1] - (width - 1) :].to(x.dtype), x.unsqueeze(-1)], dim=-1)
    out = (window * weight.to(x.dtype)).sum(-1)
    if bias is not None:
        out = out + bias.to(x.dtype)
    out = _activate(out, activation)
    return out, torch.cat([conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    inplace: bool = True,
    backend: str | None = None,
):
    """One decode step. x: (batch, dim); conv_state: (batch, dim, S) with S >= width - 1.

    In place (mamba_ssm's behaviour) it shifts the state and returns out: (batch, dim); with
    ``inplace=False`` it returns (out, new_state) and is differentiable. ``backend`` as in
    ``causal_conv1d``; the compiled step runs unless autograd needs the graph (then
    ``causal_conv1d_update_ref`` does).
    """
    check_conv_update("causal_conv1d_update", x, conv_state, weight, bias, activation)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, conv_state, weight, bias))
    kernel = None if needs_graph else fast_path(backend, x.device, "causal_conv1d_update")
    if kernel is not None:
        target = conv_state if inplace else conv_state.detach().clone()
        out = kernel(x, target, weight, bias, activation)
        return out if inplace else (out, target)
    out, new_state = causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    if inplace:
        with torch.no_grad():
            conv_state.copy_(new_state)
        return out
    return out, new_state
