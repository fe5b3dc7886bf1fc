"""Mamba-1 selective scan: the chunked CPU/any-device path and its reference twin.

Math (per batch b, channel d, state n; Δ = softplus(delta + delta_bias) when asked):

    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t            (zero-order hold on A, Euler on B)
    y_t = <C_t, h_t> + D u_t,   y_t *= silu(z_t) if z is given

Layouts follow mamba_ssm's ``selective_scan_fn``:
    u, delta, z: (batch, dim, L);  A: (dim, N);  B, C: (batch, N, L) or grouped (batch, G, N, L);
    D, delta_bias: (dim,);  initial_state / last_state: (batch, dim, N), always fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.shape_checks import check_scan, check_scan_time_major, check_state_update, run_channel_major

from ..discretization import zoh_euler
from .backend import fast_path
from .chunked import chunked_recurrence, linear_scan, pick_chunk_len

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_time_major", "selective_scan_time_major_ref",
           "selective_state_update", "selective_state_update_ref"]


def _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state):
    check_scan("selective_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)  # shapes: shared with kernels
    for name, X in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not X.is_floating_point():
            raise ValueError(f"selective_scan: {name} must be a floating-point tensor, got {X.dtype}")


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation / state dtype: fp64 for fp64 inputs, else fp32 (never lower)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def fp32(x: Tensor) -> Tensor:
    """At least fp32: parameters such as A_log, D and dt bias enter the SSM in fp32 (fp64 stays fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def _expand_groups(X: Tensor, dim: int) -> Tensor:
    """(batch, N, L) or (batch, G, N, L) -> (batch, dim or 1, N, L) broadcastable over channels."""
    if X.dim() == 3:
        return X.unsqueeze(1)
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def _discretize(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    delta = delta.to(acc_dtype(delta))
    if delta_bias is not None:
        delta = delta + delta_bias.to(delta.dtype)[..., None]
    return F.softplus(delta) if delta_softplus else delta


def _output(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype)[..., None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _scan_chunk(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus: bool):
    """One chunk, fully parallel in time: a linear scan over (batch, dim, T, N).

    Only products of decays (each <= 1) are formed, so it is stable for any Δ·A.
    Returns y: (batch, dim, T) fp32 and h_T: (batch, dim, N) fp32.
    """
    dim = u.shape[1]
    dt = _discretize(delta, delta_bias, delta_softplus)  # (b, d, T)
    acc = dt.dtype
    Bx = _expand_groups(B, dim).to(acc).transpose(-1, -2)  # (b, d|1, T, N)
    a, Bbar = zoh_euler(A.to(acc)[:, None, :], Bx, dt.unsqueeze(-1), diagonal=True)  # (b, d, T, N) each
    h = Bbar * u.to(acc).unsqueeze(-1)
    h = torch.cat([h[:, :, :1] + a[:, :, :1] * h0.unsqueeze(2), h[:, :, 1:]], dim=2)
    h = linear_scan(a, h, dim=2)
    Cx = _expand_groups(C, dim).to(acc).transpose(-1, -2)
    y = (h * Cx).sum(-1)
    # clone: a view would keep all L states alive as long as the final state lives (chunked training)
    return _output(y, u, D, z), h[:, :, -1].clone()


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    backend: str | None = None,
    chunk_len: int | None = None,
):
    """Selective scan, drop-in for mamba_ssm's ``selective_scan_fn`` plus ``initial_state``.

    ``backend``: "auto" (compiled CPU kernel / Triton on CUDA), "ref" (this PyTorch code), "cpu",
    "triton"; None reads $HISS_BACKEND (see ssm_core.ops.backend). The PyTorch path:

    Runs chunk by chunk (parallel inside a chunk, state passed between chunks) and recomputes each
    chunk in backward, so memory for backward is the inputs plus one (batch, dim, N) state per chunk.
    Gradients reach every input, ``initial_state`` included, and flow from a loss on ``last_state``.

    Returns ``out: (batch, dim, L)`` in u's dtype, and ``last_state: (batch, dim, N)`` fp32 when
    ``return_last_state``.
    """
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = fast_path(backend, u.device, "selective_scan")
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    if initial_state is None:
        initial_state = u.new_zeros(batch, dim, N, dtype=acc_dtype(u))
    T = chunk_len or pick_chunk_len(L, batch * dim * N)

    def step(seq, params, h):
        u_, delta_, B_, C_, z_ = seq
        A_, D_, bias_ = params
        return _scan_chunk(u_, delta_, A_, B_, C_, D_, z_, bias_, h, delta_softplus=delta_softplus)

    y, last = chunked_recurrence(
        step,
        seq=[(u, 2), (delta, 2), (B, -1), (C, -1), (z, 2)],
        params=[A, D, delta_bias],
        h0=initial_state.to(acc_dtype(u)),
        length=L,
        chunk_len=T,
        out_dim=2,
    )
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def selective_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):
    """Reference twin: the plain sequential recurrence, one time step at a time (slow; for tests)."""
    _check_scan_inputs(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    dt = _discretize(delta, delta_bias, delta_softplus)
    acc = dt.dtype
    Bx = _expand_groups(B, dim).to(acc)
    Cx = _expand_groups(C, dim).to(acc)
    h = u.new_zeros(batch, dim, A.shape[1], dtype=acc) if initial_state is None else initial_state.to(acc)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A.to(acc)) * h + (dt[:, :, t] * u[:, :, t].to(acc))[..., None] * Bx[..., t]
        ys.append((h * Cx[..., t]).sum(-1))
    y = _output(torch.stack(ys, dim=-1), u, D, z).to(u.dtype)
    return (y, h) if return_last_state else y


def selective_scan_time_major(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Tensor | None = None,
    *,
    backend: str | None = None,
):
    """``selective_scan`` on time-major tensors, the layout of a block's activations (no transposes):
    u, delta, z: (batch, L, dim); B, C: (batch, L, N) or (batch, L, G, N); A, D, delta_bias, initial_state as in
    ``selective_scan``. Returns ``out: (batch, L, dim)`` (and ``last_state: (batch, dim, N)``, fp32; fp64 for fp64 u).

    On CPU the compiled kernel vectorizes over channels (kernels/csrc/scan_time_major_cpu.h), the fast form for
    the short sequences of image tokens; elsewhere (CUDA, backend="ref") it is ``selective_scan`` on transposed
    views."""
    check_scan_time_major("selective_scan_time_major", u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = fast_path(backend, u.device, "selective_scan_time_major")
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    return run_channel_major(selective_scan, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                             initial_state, backend=backend)


def selective_scan_time_major_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):
    """Reference twin of ``selective_scan_time_major``: ``selective_scan_ref`` on the transposed views."""
    check_scan_time_major("selective_scan_time_major_ref", u, delta, A, B, C, D, z, delta_bias, initial_state)
    return run_channel_major(selective_scan_ref, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                             return_last_state, initial_state)


def _groups_to_rows(X: Tensor, rows: int, mamba2: bool, acc: torch.dtype) -> Tensor:
    """B/C of one token, (batch, N) or (batch, G, N) -> broadcastable against the state."""
    X = X.to(acc)
    if X.dim() == 2:
        X = X.unsqueeze(1)
    if X.shape[1] > 1:
        X = X.repeat_interleave(rows // X.shape[1], dim=1)
    return X.unsqueeze(2) if mamba2 else X


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One decode step, functional. Returns (out, new_state).

    Mamba-1 layout: state (batch, dim, N), x/dt/z (batch, dim), A (dim, N), B/C (batch, N) or
    (batch, G, N), D/dt_bias (dim,). Mamba-2 layout: state (batch, nheads, headdim, N), x/dt/z
    (batch, nheads, headdim), A (nheads, headdim, N), B/C (batch, G, N), D/dt_bias (nheads, headdim).
    """
    acc = acc_dtype(x)
    dt = dt.to(acc)
    if dt_bias is not None:
        dt = dt + dt_bias.to(acc)
    if dt_softplus:
        dt = F.softplus(dt)
    mamba2 = A.dim() == 3
    B, C = (_groups_to_rows(X, A.shape[0], mamba2, acc) for X in (B, C))
    new_state = torch.exp(dt.unsqueeze(-1) * A.to(acc)) * state.to(acc) + (dt * x.to(acc)).unsqueeze(-1) * B
    out = (new_state * C).sum(-1)
    if D is not None:
        out = out + x.to(acc) * D.to(acc)
    if z is not None:
        out = out * F.silu(z.to(acc))
    return out.to(x.dtype), new_state


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    inplace: bool = True,
    backend: str | None = None,
):
    """Advance the SSM state by one token (or T tokens), like mamba_ssm's ``selective_state_update``.

    x: (batch, *A.shape[:-1]) for one token, or (batch, T, *A.shape[:-1]) for T tokens (then dt, z,
    B, C carry the same T axis after batch). With ``inplace`` (mamba_ssm's behaviour) the state
    tensor is overwritten and ``out`` returned; with ``inplace=False`` it returns ``(out, new_state)``
    and is differentiable in every input, the state included.

    ``backend`` as in ``selective_scan``: the compiled CPU / Triton step runs unless autograd needs
    the graph (then this PyTorch code does, which is what makes ``inplace=False`` differentiable).
    """
    several = check_state_update("selective_state_update", state, x, dt, A, B, C, D, z, dt_bias)
    tensors = (state, x, dt, A, B, C, D, z, dt_bias)
    kernel = None
    if not _wants_grad(*tensors):
        kernel = fast_path(backend, x.device, "selective_state_update")
    if kernel is not None:
        target = state if inplace else state.detach().to(acc_dtype(x), copy=True)
        out = kernel(target, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        return out if inplace else (out, target)
    if several:
        outs, h = [], state
        for t in range(x.shape[1]):
            o, h = selective_state_update_ref(
                h, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, None if z is None else z[:, t], dt_bias, dt_softplus
            )
            outs.append(o)
        out, new_state = torch.stack(outs, dim=1), h
    else:
        out, new_state = selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if inplace:
        with torch.no_grad():
            state.copy_(new_state)
        return out
    return out, new_state
