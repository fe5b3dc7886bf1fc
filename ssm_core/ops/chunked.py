"""Sequence-chunked recurrence with recomputation in backward.

A recurrence ``(y_chunk, h_next) = step(seq_chunk, params, h)`` is run chunk by chunk. Forward keeps
only the inputs and the state at each chunk boundary; backward walks the chunks in reverse,
recomputes one chunk under autograd and back-propagates the output gradient together with the
gradient of the carried state. Peak memory for backward is therefore one chunk's activations,
whatever the length, and the gradients are exact (the same as one-shot autograd).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

StepFn = Callable[[list, list, Tensor], tuple[Tensor, Tensor]]

# Elements of one chunk's (batch, dim, T, N) working set: ~2 MiB in fp32 stays in cache (measured fastest).
DEFAULT_CHUNK_ELEMS = 1 << 19


def pick_chunk_len(length: int, elems_per_step: int, budget: int = DEFAULT_CHUNK_ELEMS) -> int:
    """Largest power of two T with T * elems_per_step <= budget (at least 16, at most length)."""
    T = max(16, budget // max(elems_per_step, 1))
    T = 1 << (T.bit_length() - 1)
    return max(1, min(T, length))


def _hillis_steele_(a: Tensor, x: Tensor, dim: int) -> Tensor:
    """In place: x[t] <- x[t] + a[t] * x[t-1] along ``dim`` for all t at once (log2(T) sweeps).
    ``a`` is overwritten with cumulative products. Only products of the a's are formed (stable)."""
    T, k = x.shape[dim], 1
    while k < T:
        n = T - k
        x.narrow(dim, k, n).add_(a.narrow(dim, k, n) * x.narrow(dim, 0, n))
        if 2 * k < T:
            a.narrow(dim, k, n).mul_(a.narrow(dim, 0, n).clone())
        k *= 2
    return x


class LinearScan(torch.autograd.Function):
    """h_t = a_t * h_{t-1} + x_t along ``dim`` with h_{-1} = 0; the adjoint is the same scan reversed.
    Real or complex: with complex a the adjoint runs with conj(a), G_t = g_t + conj(a_{t+1}) G_{t+1},
    dx_t = G_t, da_t = conj(h_{t-1}) G_t (PyTorch's convention); conj is the identity on real tensors."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, dim: int):
        h = _hillis_steele_(a.clone(), x.clone(), dim)
        ctx.dim = dim
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):
        a, h = ctx.saved_tensors
        dim, T = ctx.dim, a.shape[ctx.dim]
        # g_x[t] = gh[t] + a[t+1] * g_x[t+1]: a forward scan over reversed time with shifted a
        a_next = torch.cat([a.narrow(dim, 1, T - 1), torch.zeros_like(a.narrow(dim, 0, 1))], dim=dim).conj()
        gx = _hillis_steele_(a_next.flip(dim).resolve_conj(), gh.flip(dim).contiguous(), dim).flip(dim)
        ga = torch.zeros_like(a)
        ga.narrow(dim, 1, T - 1).copy_(gx.narrow(dim, 1, T - 1) * h.narrow(dim, 0, T - 1).conj())
        return ga, gx, None


def linear_scan(a: Tensor, x: Tensor, dim: int) -> Tensor:
    """All states of the first-order linear recurrence h_t = a_t h_{t-1} + x_t (h_{-1} = 0)."""
    return LinearScan.apply(a, x, dim)


def _slice(x: Tensor | None, dim: int, start: int, end: int) -> Tensor | None:
    return None if x is None else x.narrow(dim, start, end - start)


class _ChunkedRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step, seq_dims, chunk_len, length, out_dim, h0, *tensors):
        n_seq = len(seq_dims)
        seq, params = list(tensors[:n_seq]), list(tensors[n_seq:])
        starts = list(range(0, length, chunk_len))
        h, ys, boundaries = h0, [], []
        for s in starts:
            e = min(s + chunk_len, length)
            boundaries.append(h)
            y, h = step([_slice(x, d, s, e) for x, d in zip(seq, seq_dims)], params, h)
            ys.append(y)
        ctx.step, ctx.seq_dims, ctx.chunk_len, ctx.length, ctx.out_dim = step, seq_dims, chunk_len, length, out_dim
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(*tensors, *boundaries)
        return torch.cat(ys, dim=out_dim), h

    @staticmethod
    def backward(ctx, gy, gh):
        saved = ctx.saved_tensors
        tensors, boundaries = saved[: ctx.n_tensors], saved[ctx.n_tensors :]
        n_seq = len(ctx.seq_dims)
        needs = ctx.needs_input_grad[6:]
        seq, params = tensors[:n_seq], tensors[n_seq:]
        grads: list[Tensor | None] = [
            torch.zeros_like(t) if (t is not None and need) else None for t, need in zip(tensors, needs)
        ]
        need_h0 = ctx.needs_input_grad[5]
        starts = list(range(0, ctx.length, ctx.chunk_len))
        for i in reversed(range(len(starts))):
            s = starts[i]
            e = min(s + ctx.chunk_len, ctx.length)
            with torch.enable_grad():
                seq_c = [
                    None if x is None else _slice(x, d, s, e).detach().requires_grad_(need)
                    for x, d, need in zip(seq, ctx.seq_dims, needs[:n_seq])
                ]
                par_c = [
                    None if p is None else p.detach().requires_grad_(need) for p, need in zip(params, needs[n_seq:])
                ]
                h_in = boundaries[i].detach().requires_grad_(i > 0 or need_h0)
                y, h = ctx.step(seq_c, par_c, h_in)
                leaves = [(k, t) for k, t in enumerate(seq_c + par_c) if t is not None and t.requires_grad]
                inputs = [t for _, t in leaves] + ([h_in] if h_in.requires_grad else [])
                outs = torch.autograd.grad(
                    (y, h), inputs, (gy.narrow(ctx.out_dim, s, e - s), gh), allow_unused=True
                )
            for (k, _), g in zip(leaves, outs):
                if g is None:
                    continue
                if k < n_seq:
                    grads[k].narrow(ctx.seq_dims[k], s, e - s).add_(g)
                else:
                    grads[k].add_(g)
            gh = outs[-1] if h_in.requires_grad else None
            if gh is None:
                gh = torch.zeros_like(boundaries[i])
        return (None, None, None, None, None, gh if need_h0 else None, *grads)


def chunked_recurrence(
    step: StepFn,
    seq: Sequence[tuple[Tensor | None, int]],
    params: Sequence[Tensor | None],
    h0: Tensor,
    length: int,
    chunk_len: int,
    out_dim: int,
) -> tuple[Tensor, Tensor]:
    """Run ``step`` over ``length`` positions in chunks of ``chunk_len``; returns (y, h_last).

    seq: (tensor, time_dim) pairs sliced per chunk (None passes through); params: whole tensors.
    ``y`` is the chunk outputs concatenated along ``out_dim``.
    """
    if length <= 0:
        raise ValueError(f"chunked_recurrence: sequence length must be positive, got {length}")
    seq_dims = tuple(d % x.dim() if x is not None else d for x, d in seq)
    tensors = [x for x, _ in seq] + list(params)
    return _ChunkedRecurrence.apply(step, seq_dims, chunk_len, length, out_dim, h0, *tensors)
