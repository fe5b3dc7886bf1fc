"""Shape checks: the argument and layout rules of every op, shared by the CPU and Triton front-ends and
by ssm_core's PyTorch path.

Every public kernel function validates its inputs here (with its own name in the messages), so the
two backends and the reference path accept exactly the same shapes. ``kernels`` never imports ``ssm_core``;
ssm_core's ops (scan, SSD, conv, decode step) import this module at import time, which is why it imports
only torch (no kernel loading, no compiler, no triton).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ACTIVATIONS = (None, "silu", "swish")


def pad_time_major(x: Tensor, init: Tensor | None, width: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The time-major conv's padded input and final state, shared by its compiled and PyTorch paths (a layout
    rule, like the checks below): x (batch, L, dim), init (batch, dim, W - 1) or None ->
    xp (batch, L + W - 1, dim) in ``dtype`` (init's W - 1 inputs or zeros, then x; detached) and the final
    state (batch, dim, W - 1), the last W - 1 inputs in their own storage (a view would pin xp)."""
    b, L, d = x.shape
    xp = x.new_empty(b, L + width - 1, d, dtype=dtype)
    if init is None:
        xp[:, : width - 1].zero_()
    else:
        xp[:, : width - 1].copy_(init.detach().transpose(1, 2))
    xp[:, width - 1:].copy_(x.detach())
    final = x.new_empty(b, d, width - 1).copy_(xp[:, L:].transpose(1, 2))
    return xp, final


def _check_u_delta(name: str, u, delta) -> tuple[int, int, int]:
    """The scans' u and delta: (batch, dim, L) with L >= 1; returns (batch, dim, L)."""
    if u.dim() != 3:
        raise ValueError(f"{name}: u must be (batch, dim, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    if L < 1:
        raise ValueError(f"{name}: sequence length must be positive")
    if delta.shape != u.shape:
        raise ValueError(f"{name}: delta must match u {tuple(u.shape)}, got {tuple(delta.shape)}")
    return batch, dim, L


def _check_D_z_bias(name: str, u, D, z, delta_bias) -> None:
    """The scans' optional D, delta_bias (dim,) and z (like u)."""
    dim = u.shape[1]
    for label, X in (("D", D), ("delta_bias", delta_bias)):
        if X is not None and X.shape != (dim,):
            raise ValueError(f"{name}: {label} must be (dim={dim},), got {tuple(X.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"{name}: z must match u {tuple(u.shape)}, got {tuple(z.shape)}")


def check_scan(name: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """selective scan: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, [G,] N, L); D, bias (dim,)."""
    batch, dim, L = _check_u_delta(name, u, delta)
    if A.dim() != 2 or A.shape[0] != dim or A.is_complex():
        raise ValueError(f"{name}: A must be real (dim={dim}, N), got {tuple(A.shape)} {A.dtype}")
    N = A.shape[1]
    for label, X in (("B", B), ("C", C)):
        ok = (X.dim() == 3 and X.shape == (batch, N, L)) or (
            X.dim() == 4 and X.shape[0] == batch and X.shape[2:] == (N, L) and dim % X.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"{name}: {label} must be (batch={batch}, N={N}, L={L}) or (batch, G, N, L) "
                f"with G dividing dim={dim}, got {tuple(X.shape)}"
            )
    if (1 if B.dim() == 3 else B.shape[1]) != (1 if C.dim() == 3 else C.shape[1]):
        raise ValueError(f"{name}: B and C must have the same number of groups")
    _check_D_z_bias(name, u, D, z, delta_bias)
    if initial_state is not None and initial_state.shape != (batch, dim, N):
        raise ValueError(
            f"{name}: initial_state must be (batch={batch}, dim={dim}, N={N}), got {tuple(initial_state.shape)}"
        )


def check_scan_time_major(name: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """time-major selective scan: u, delta, z (batch, L, dim); A (dim, N); B, C (batch, L, [G,] N); D, bias (dim,);
    the rules of ``check_scan`` on the channel-major views."""
    for label, X in (("u", u), ("delta", delta), ("z", z)):
        if X is not None and X.dim() != 3:
            raise ValueError(f"{name}: {label} must be (batch, L, dim), got {tuple(X.shape)}")
    for label, X in (("B", B), ("C", C)):
        if X.dim() not in (3, 4) or X.shape[:2] != u.shape[:2]:
            raise ValueError(f"{name}: {label} must be (batch, L, N) or (batch, L, G, N) with (batch, L) = "
                             f"{tuple(u.shape[:2])}, got {tuple(X.shape)}")

    u_, delta_, B_, C_, z_ = channel_major_views(u, delta, B, C, z)
    check_scan(name, u_, delta_, A, B_, C_, D, z_, delta_bias, initial_state)


def channel_major_views(u, delta, B, C, z):
    """A time-major scan's u, delta, z (batch, L, dim) and B, C (batch, L, [G,] N) as views in the channel-major
    layout of ``check_scan``: (batch, dim, L) and (batch, [G,] N, L)."""
    def bc(X):
        return X.transpose(1, 2) if X.dim() == 3 else X.permute(0, 2, 3, 1)

    return u.transpose(1, 2), delta.transpose(1, 2), bc(B), bc(C), None if z is None else z.transpose(1, 2)


def run_channel_major(scan: Callable, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                      initial_state, **kwargs):
    """A time-major scan computed by a channel-major one (``scan``: ``selective_scan``'s arguments) on transposed
    views: out (batch, L, dim) [, last_state]."""
    u_, delta_, B_, C_, z_ = channel_major_views(u, delta, B, C, z)
    res = scan(u_, delta_, A, B_, C_, D, z_, delta_bias, delta_softplus, return_last_state, initial_state, **kwargs)
    return (res[0].transpose(1, 2), res[1]) if return_last_state else res.transpose(1, 2)


def check_complex_scan(name: str, u, delta, A, B, C, D, z, delta_bias, initial_state) -> tuple[bool, bool]:
    """complex scan: u, delta, z (batch, dim, L) real; A (dim, N) complex; B, C complex, each (dim, N)
    (time-invariant) or (batch, [G,] N, L); D, bias (dim,) real; initial_state (batch, dim, N) complex.
    Returns whether B and C are input-dependent."""
    batch, dim, L = _check_u_delta(name, u, delta)
    for label, X in (("u", u), ("delta", delta), ("z", z), ("D", D), ("delta_bias", delta_bias)):
        if X is not None and not X.is_floating_point():
            raise ValueError(f"{name}: {label} must be a real floating-point tensor, got {X.dtype}")
    if A.dim() != 2 or A.shape[0] != dim or not A.is_complex():
        raise ValueError(f"{name}: A must be complex (dim={dim}, N), got {tuple(A.shape)} {A.dtype}")
    N = A.shape[1]
    groups = []
    for label, X in (("B", B), ("C", C)):
        if not X.is_complex():
            raise ValueError(f"{name}: {label} must be complex, got {X.dtype}")
        if X.dim() == 2 and X.shape == (dim, N):
            groups.append(None)
            continue
        ok = (X.dim() == 3 and X.shape == (batch, N, L)) or (
            X.dim() == 4 and X.shape[0] == batch and X.shape[2:] == (N, L) and X.shape[1] > 0 and dim % X.shape[1] == 0
        )
        if not ok:
            raise ValueError(
                f"{name}: {label} must be (dim={dim}, N={N}) (time-invariant), (batch={batch}, N, L={L}) or "
                f"(batch, G, N, L) with G dividing dim, got {tuple(X.shape)}"
            )
        groups.append(1 if X.dim() == 3 else X.shape[1])
    if None not in groups and groups[0] != groups[1]:
        raise ValueError(f"{name}: B and C must have the same number of groups")
    _check_D_z_bias(name, u, D, z, delta_bias)
    if initial_state is not None and (initial_state.shape != (batch, dim, N) or not initial_state.is_complex()):
        raise ValueError(f"{name}: initial_state must be complex (batch={batch}, dim={dim}, N={N}), "
                         f"got {tuple(initial_state.shape)} {initial_state.dtype}")
    return groups[0] is not None, groups[1] is not None


def check_ssd(name: str, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size) -> None:
    """SSD: x, z (batch, L, H, P); dt (batch, L, H); A, dt_bias (H,); B, C (batch, L, G, N); D (H,) | (H, P)."""
    if x.dim() != 4:
        raise ValueError(f"{name}: x must be (batch, L, nheads, headdim), got {tuple(x.shape)}")
    b, L, H, P = x.shape
    if L < 1:
        raise ValueError(f"{name}: sequence length must be positive")
    if dt.shape != (b, L, H):
        raise ValueError(f"{name}: dt must be (batch={b}, L={L}, nheads={H}), got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"{name}: A must be (nheads={H},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, L) or H % B.shape[2] or C.shape != B.shape:
        raise ValueError(
            f"{name}: B and C must be (batch={b}, L={L}, ngroups, dstate) with ngroups dividing nheads={H}, "
            f"got {tuple(B.shape)} and {tuple(C.shape)}"
        )
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"{name}: D must be (nheads,) or (nheads, headdim) = ({H}, {P}), got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{name}: z must match x {tuple(x.shape)}, got {tuple(z.shape)}")
    if dt_bias is not None and dt_bias.shape != (H,):
        raise ValueError(f"{name}: dt_bias must be (nheads={H},), got {tuple(dt_bias.shape)}")
    N = B.shape[3]
    if initial_states is not None and initial_states.shape != (b, H, P, N):
        raise ValueError(f"{name}: initial_states must be ({b}, {H}, {P}, {N}), got {tuple(initial_states.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, L):
        raise ValueError(f"{name}: seq_idx must be (batch={b}, L={L}), got {tuple(seq_idx.shape)}")
    if int(chunk_size) <= 0:
        raise ValueError(f"{name}: chunk_size must be positive, got {chunk_size}")


def check_conv(name: str, x, weight, bias, seq_idx, initial_states, activation) -> None:
    """causal conv1d: x (batch, dim, L); weight (dim, W); bias (dim,); states (batch, dim, W-1); seq_idx (batch, L)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be in {ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"{name}: expected x (batch, dim, L) and weight (dim, width), got {tuple(x.shape)} and "
            f"{tuple(weight.shape)}"
        )
    batch, dim, L = x.shape
    W = weight.shape[1]
    if L < 1:
        raise ValueError(f"{name}: sequence length must be positive")
    if bias is not None and bias.shape != (dim,):
        raise ValueError(f"{name}: bias must be (dim={dim},), got {tuple(bias.shape)}")
    if initial_states is not None and initial_states.shape != (batch, dim, W - 1):
        raise ValueError(
            f"{name}: initial_states must be (batch={batch}, dim={dim}, width-1={W - 1}), "
            f"got {tuple(initial_states.shape)}"
        )
    if seq_idx is not None and seq_idx.shape != (batch, L):
        raise ValueError(f"{name}: seq_idx must be (batch={batch}, L={L}), got {tuple(seq_idx.shape)}")


def check_conv_update(name: str, x, conv_state, weight, bias, activation) -> None:
    """conv decode step: x (batch, dim); conv_state (batch, dim, S >= max(W - 1, 1)); weight (dim, W)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be in {ACTIVATIONS}, got {activation!r}")
    W = weight.shape[1] if weight.dim() == 2 else 0
    bad_state = conv_state.dim() != 3 or conv_state.shape[:2] != x.shape or conv_state.shape[-1] < max(W - 1, 1)
    if x.dim() != 2 or bad_state:
        raise ValueError(
            f"{name}: conv_state must be (batch, dim, >= {max(W - 1, 1)}) matching x {tuple(x.shape)}, "
            f"got {tuple(conv_state.shape)}"
        )
    if weight.dim() != 2 or weight.shape[0] != x.shape[1] or (bias is not None and bias.shape != (x.shape[1],)):
        raise ValueError(f"{name}: weight must be (dim, width) and bias (dim,)")


def check_state_update(name: str, state, x, dt, A, B, C, D, z, dt_bias) -> bool:
    """Decode step: Mamba-1 state (batch, dim, N), x/dt/z (batch, [T,] dim), A (dim, N), B/C (batch, [T,] [G,] N),
    D/dt_bias (dim,); Mamba-2 adds a head axis: state (batch, H, P, N), x (batch, [T,] H, P), A (H, P, N),
    D/dt_bias (H, P). Returns whether x carries a token axis T."""
    if A.dim() not in (2, 3) or state.dim() != A.dim() + 1 or state.shape[1:] != A.shape:
        raise ValueError(f"{name}: state must be (batch, *A.shape)={('batch', *A.shape)}, got {tuple(state.shape)}")
    rows_shape = A.shape[:-1]
    bad_rows = x.shape[0] != state.shape[0] or x.shape[-len(rows_shape):] != rows_shape
    if x.dim() not in (A.dim(), A.dim() + 1) or bad_rows:
        raise ValueError(
            f"{name}: x must be {('batch', *A.shape[:-1])} for one token or "
            f"{('batch', 'T', *A.shape[:-1])} for T tokens, got {tuple(x.shape)}"
        )
    several = x.dim() == A.dim() + 1
    lead = tuple(x.shape[:2]) if several else (x.shape[0],)
    rows = A.shape[0]
    for label, X in (("dt", dt), ("z", z)):
        if X is not None and X.shape != x.shape:
            raise ValueError(f"{name}: {label} must match x {tuple(x.shape)}, got {tuple(X.shape)}")
    for label, X in (("D", D), ("dt_bias", dt_bias)):
        if X is not None and X.shape != A.shape[:-1]:
            raise ValueError(f"{name}: {label} must be {tuple(A.shape[:-1])}, got {tuple(X.shape)}")
    for label, X in (("B", B), ("C", C)):
        ok = X.dim() in (len(lead) + 1, len(lead) + 2) and tuple(X.shape[: len(lead)]) == lead
        ok = ok and X.shape[-1] == A.shape[-1] and (X.dim() == len(lead) + 1 or rows % X.shape[-2] == 0)
        if not ok:
            raise ValueError(
                f"{name}: {label} must be {(*lead, A.shape[-1])} or {(*lead, 'G', A.shape[-1])} with G "
                f"dividing {rows}, got {tuple(X.shape)}"
            )
    if B.shape != C.shape:
        raise ValueError(f"{name}: B and C must have the same shape, got {tuple(B.shape)} and {tuple(C.shape)}")
    return several


def per_token(several: bool, step: Callable[..., Tensor], x, dt, B, C, z) -> Tensor:
    """``step(x, dt, B, C, z)`` for one token, or for each of T tokens (axis 1) with outputs stacked."""
    if not several:
        return step(x, dt, B, C, z)
    outs = [step(x[:, t], dt[:, t], B[:, t], C[:, t], None if z is None else z[:, t]) for t in range(x.shape[1])]
    return torch.stack(outs, dim=1)
