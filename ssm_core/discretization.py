"""Discretization of continuous-time linear systems ``x'(t) = A x(t) + B u(t)``.

Turns ``(A, B)`` and a step ``dt`` into ``(Abar, Bbar)`` with ``x[k+1] = Abar x[k] + Bbar u[k]``.

Methods (``method=`` of :func:`discretize`):

- ``"zoh"``        zero-order hold: ``Abar = exp(dt A)``, ``Bbar = A^{-1} (exp(dt A) - I) B``
- ``"bilinear"``   bilinear / Tustin: ``Abar = (I - dt/2 A)^{-1} (I + dt/2 A)``,
                   ``Bbar = (I - dt/2 A)^{-1} dt B``
- ``"euler"``      forward Euler: ``Abar = I + dt A``, ``Bbar = dt B``
- ``"zoh_euler"``  the Mamba-1 simplification: ``Abar = exp(dt A)``, ``Bbar = dt B``

These match ``scipy.signal.cont2discrete(..., method="zoh" | "bilinear" | "euler")``.

Two layouts of ``A``:

- **diagonal**: ``A`` holds the eigenvalues, shape ``(..., N)``; ``B`` is ``(..., N)`` (one input per
  state, i.e. the diagonal of a per-state input map, as in Mamba / S4D); ``dt`` broadcasts against both.
  Everything is elementwise. Shapes follow ordinary broadcasting, so for Mamba-style ``A: (dim, N)``,
  ``dt: (batch, dim, L, 1)``, ``B: (batch, 1, L, N)`` pass ``A[:, None, :]`` (``(dim, 1, N)``).
  Size-1 dimensions broadcast too, e.g. Mamba-2's scalar-per-head ``A: (nheads, 1)`` with ``B: (..., N)``.
  ``Abar`` has shape ``broadcast(A, dt)`` and ``Bbar`` has shape ``broadcast(A, B, dt)``.
- **dense**: ``A: (..., N, N)``, ``B: (..., N, M)``, ``dt`` a scalar or a tensor of batch shape ``(...)``
  (broadcast against ``A.shape[:-2]`` and ``B.shape[:-2]``; do *not* append trailing ``1, 1``).
  Both outputs have the full batch shape ``batch = broadcast(A.shape[:-2], B.shape[:-2], dt.shape)``:
  ``Abar: (*batch, N, N)``, ``Bbar: (*batch, N, M)``.

``diagonal=None`` infers the layout: **dense** iff ``A.dim() >= 2``, ``A.shape[-1] == A.shape[-2]``,
``B.dim() >= 2`` and ``B.shape[-2] == A.shape[-1]``; otherwise **diagonal**. A stack of diagonal
systems whose batch size happens to equal ``N`` (e.g. ``A: (N, N)`` of eigenvalues with ``B: (N, N)``)
is therefore read as dense: pass ``diagonal=True`` explicitly there.

Precision: the computation runs in float32 for float32 / bfloat16 / float16 (and integer) inputs and in
float64 when any input is float64 (complex64 / complex128 likewise for complex ``A``, e.g. S4D). The
outputs are returned in that compute dtype (fp32 or better, never half precision: ``exp(dt A)`` close to
1 would not survive a cast to bf16). A Python-number ``dt`` is converted straight to the compute dtype.

All functions are differentiable with autograd, including through the ``A -> 0`` limit of diagonal zoh.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["METHODS", "discretize", "zoh", "bilinear", "euler", "zoh_euler"]

METHODS: tuple[str, ...] = ("zoh", "bilinear", "euler", "zoh_euler")
_ALIASES = {"tustin": "bilinear", "forward_euler": "euler"}

# |dt*A| below which expm1(z)/z is replaced by its Taylor series (see _phi1).
# Series truncation error |z|^7/8! stays below the dtype's eps there, and above it the autograd
# derivative of expm1(z)/z (which cancels like eps/|z|) is accurate to ~1e-14 (fp64) / ~1e-6 (fp32).
_SERIES_THRESHOLD = {torch.float32: 0.2, torch.float64: 1e-2}


# ----------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 / complex128 if any input is double precision, else float32 / complex64."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype.is_complex:
        return torch.complex128 if dtype == torch.complex128 else torch.complex64
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(A: Tensor, B: Tensor, dt: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Convert inputs to tensors in the compute dtype on ``A``'s device (differentiably)."""
    if not isinstance(A, Tensor):
        A = torch.as_tensor(A)
    if not isinstance(B, Tensor):
        B = torch.as_tensor(B, device=A.device)
    if isinstance(dt, Tensor):
        dtype = _compute_dtype(A, B, dt)
        if dt.is_complex():
            raise ValueError(f"dt must be real, got dtype {dt.dtype}")
        dt = dt.to(device=A.device, dtype=_real_dtype(dtype))
    else:
        if isinstance(dt, complex):
            raise ValueError(f"dt must be real, got {dt!r}")
        dtype = _compute_dtype(A, B)
        dt = torch.as_tensor(dt, dtype=_real_dtype(dtype), device=A.device)
    return A.to(dtype), B.to(dtype), dt


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def _is_dense(A: Tensor, B: Tensor, diagonal: bool | None) -> bool:
    if diagonal is not None:
        return not diagonal
    return A.dim() >= 2 and A.shape[-1] == A.shape[-2] and B.dim() >= 2 and B.shape[-2] == A.shape[-1]


def _check_diagonal(A: Tensor, B: Tensor, dt: Tensor) -> None:
    if A.dim() < 1:
        raise ValueError(f"diagonal case: expected A of shape (..., N), got a 0-d tensor {tuple(A.shape)}")
    if B.dim() < 1:
        raise ValueError(
            f"diagonal case: expected B of shape (..., {A.shape[-1]}) to match A of shape "
            f"{tuple(A.shape)}, got a 0-d tensor {tuple(B.shape)}"
        )
    try:
        torch.broadcast_shapes(A.shape, B.shape, dt.shape)
    except RuntimeError:
        raise ValueError(
            f"diagonal case: expected A: (..., N), B: (..., N) and dt broadcastable against each other, "
            f"got A {tuple(A.shape)}, B {tuple(B.shape)}, dt {tuple(dt.shape)} "
            f"(e.g. B of shape (..., {A.shape[-1]}); for A: (dim, N) with dt: (batch, dim, L, 1) pass "
            "A[:, None, :])"
        ) from None


def _check_dense(A: Tensor, B: Tensor, dt: Tensor) -> torch.Size:
    """Validate the dense layout and return the common batch shape."""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"dense case: expected A of shape (..., N, N), got {tuple(A.shape)}")
    N = A.shape[-1]
    if B.dim() < 2 or B.shape[-2] != N:
        raise ValueError(
            f"dense case: expected B of shape (..., {N}, M) to match A of shape {tuple(A.shape)}, "
            f"got {tuple(B.shape)}"
        )
    try:
        return torch.broadcast_shapes(A.shape[:-2], B.shape[:-2], dt.shape)
    except RuntimeError:
        raise ValueError(
            f"dense case: batch shapes of A {tuple(A.shape[:-2])} (from {tuple(A.shape)}), "
            f"B {tuple(B.shape[:-2])} (from {tuple(B.shape)}) and dt {tuple(dt.shape)} are not "
            "broadcastable; dt must be a scalar or have the batch shape (...), without trailing (1, 1)"
        ) from None


def _phi1(z: Tensor) -> Tensor:
    """``expm1(z) / z`` with the removable singularity at 0 filled in (value and gradient)."""
    thr = _SERIES_THRESHOLD[_real_dtype(z.dtype)]
    small = z.abs() < thr
    # Keep the masked-out branch finite so autograd through torch.where produces no NaN.
    z_safe = torch.where(small, torch.ones_like(z), z)
    direct = torch.expm1(z_safe) / z_safe
    z_tiny = torch.where(small, z, torch.zeros_like(z))
    series = torch.ones_like(z)  # sum_{k=0..6} z^k / (k+1)!, Horner form
    for k in range(7, 1, -1):
        series = 1 + series * z_tiny / k
    return torch.where(small, series, direct)


def _matrix_exp(X: Tensor) -> Tensor:
    """``torch.linalg.matrix_exp`` that avoids its single-matrix fast path.

    For a lone matrix (batch of one) torch selects a degree-8 Taylor kernel with a wrong coefficient
    (pytorch/pytorch#196592): relative errors ~1e-10 in float64 and ~1e-5 in float32 for 1-norms of
    roughly 1e-2..5e-2, gradients included. Batched inputs take an accurate path, so a lone matrix is
    padded with a zero matrix (cheapest degree) and the pad dropped again.
    """
    if X.shape[:-2].numel() != 1:
        return torch.linalg.matrix_exp(X)
    n = X.shape[-1]
    padded = torch.cat([X.reshape(1, n, n), X.new_zeros(1, n, n)])
    return torch.linalg.matrix_exp(padded)[0].reshape(X.shape)


def _eye_like(A: Tensor) -> Tensor:
    return torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)


def _resolve_method(method: str) -> str:
    if not isinstance(method, str):
        raise ValueError(f"method must be a string, one of {METHODS}, got {method!r}")
    key = method.lower()
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        raise ValueError(
            f"unknown discretization method {method!r}; expected one of {METHODS} "
            f"(aliases: {', '.join(f'{k!r}->{v!r}' for k, v in _ALIASES.items())})"
        )
    return key


# ----------------------------------------------------------------------------- methods


def zoh(A: Tensor, B: Tensor, dt: float | Tensor, *, diagonal: bool | None = None) -> tuple[Tensor, Tensor]:
    """Zero-order hold: ``Abar = exp(dt A)``, ``Bbar = A^{-1} (exp(dt A) - I) B``.

    Diagonal: ``A: (..., N)``, ``B: (..., N)``, ``dt`` broadcastable -> ``Abar: broadcast(A, dt)``,
    ``Bbar: broadcast(A, B, dt)``. ``Bbar = dt * expm1(dt A) / (dt A) * B``; entries with tiny
    ``|dt A|`` (including ``A == 0``) use the Taylor series so ``Bbar -> dt B`` with finite gradients.

    Dense: ``A: (..., N, N)``, ``B: (..., N, M)``, ``dt: ()`` or ``(...)`` -> ``Abar: (*batch, N, N)``,
    ``Bbar: (*batch, N, M)``, read off ``matrix_exp(dt [[A, B], [0, 0]]) = [[Abar, Bbar], [0, I]]``
    (valid for singular ``A``).
    """
    A, B, dt = _prepare(A, B, dt)
    if _is_dense(A, B, diagonal):
        batch = _check_dense(A, B, dt)
        N, M = A.shape[-1], B.shape[-1]
        d = dt[..., None, None]
        top = torch.cat([(A * d).expand(*batch, N, N), (B * d).expand(*batch, N, M)], dim=-1)
        bottom = torch.zeros(*batch, M, N + M, dtype=A.dtype, device=A.device)
        E = _matrix_exp(torch.cat([top, bottom], dim=-2))
        return E[..., :N, :N], E[..., :N, N:]
    _check_diagonal(A, B, dt)
    z = dt * A
    return torch.exp(z), dt * _phi1(z) * B


def bilinear(
    A: Tensor, B: Tensor, dt: float | Tensor, *, diagonal: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Bilinear (Tustin): ``Abar = (I - dt/2 A)^{-1} (I + dt/2 A)``, ``Bbar = (I - dt/2 A)^{-1} dt B``.

    Diagonal: ``A: (..., N)``, ``B: (..., N)``, ``dt`` broadcastable -> ``Abar: broadcast(A, dt)``,
    ``Bbar: broadcast(A, B, dt)`` (elementwise divisions).

    Dense: ``A: (..., N, N)``, ``B: (..., N, M)``, ``dt: ()`` or ``(...)`` -> ``Abar: (*batch, N, N)``,
    ``Bbar: (*batch, N, M)`` via ``torch.linalg.solve`` (no explicit inverse).
    """
    A, B, dt = _prepare(A, B, dt)
    if _is_dense(A, B, diagonal):
        batch = _check_dense(A, B, dt)
        N, M = A.shape[-1], B.shape[-1]
        d = dt[..., None, None]
        eye = _eye_like(A)
        half = (d / 2) * A
        ima = (eye - half).expand(*batch, N, N)
        Abar = torch.linalg.solve(ima, (eye + half).expand(*batch, N, N))
        Bbar = torch.linalg.solve(ima, (d * B).expand(*batch, N, M))
        return Abar, Bbar
    _check_diagonal(A, B, dt)
    half = (dt / 2) * A
    denom = 1 - half
    return (1 + half) / denom, dt * B / denom


def euler(A: Tensor, B: Tensor, dt: float | Tensor, *, diagonal: bool | None = None) -> tuple[Tensor, Tensor]:
    """Forward Euler: ``Abar = I + dt A``, ``Bbar = dt B``.

    Diagonal: ``A: (..., N)``, ``B: (..., N)``, ``dt`` broadcastable -> ``Abar: broadcast(A, dt)``,
    ``Bbar: broadcast(A, B, dt)``.

    Dense: ``A: (..., N, N)``, ``B: (..., N, M)``, ``dt: ()`` or ``(...)`` -> ``Abar: (*batch, N, N)``,
    ``Bbar: (*batch, N, M)``.
    """
    A, B, dt = _prepare(A, B, dt)
    if _is_dense(A, B, diagonal):
        batch = _check_dense(A, B, dt)
        N, M = A.shape[-1], B.shape[-1]
        d = dt[..., None, None]
        return (_eye_like(A) + d * A).expand(*batch, N, N), (d * B).expand(*batch, N, M)
    _check_diagonal(A, B, dt)
    return 1 + dt * A, dt * B * torch.ones_like(A)


def zoh_euler(
    A: Tensor, B: Tensor, dt: float | Tensor, *, diagonal: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Mamba-1 simplification: zoh for ``A`` (``Abar = exp(dt A)``), Euler for ``B`` (``Bbar = dt B``).

    Diagonal: ``A: (..., N)``, ``B: (..., N)``, ``dt`` broadcastable -> ``Abar: broadcast(A, dt)``,
    ``Bbar: broadcast(A, B, dt)``. This is Mamba's ``deltaA = exp(delta * A)``, ``deltaB = delta * B``.

    Dense: ``A: (..., N, N)``, ``B: (..., N, M)``, ``dt: ()`` or ``(...)`` -> ``Abar = matrix_exp(dt A)``
    of shape ``(*batch, N, N)``, ``Bbar = dt B`` of shape ``(*batch, N, M)``.
    """
    A, B, dt = _prepare(A, B, dt)
    if _is_dense(A, B, diagonal):
        batch = _check_dense(A, B, dt)
        N, M = A.shape[-1], B.shape[-1]
        d = dt[..., None, None]
        return _matrix_exp(d * A).expand(*batch, N, N), (d * B).expand(*batch, N, M)
    _check_diagonal(A, B, dt)
    shape = torch.broadcast_shapes(A.shape, B.shape, dt.shape)
    return torch.exp(dt * A), torch.broadcast_to(dt * B, shape)


_METHOD_FNS = {"zoh": zoh, "bilinear": bilinear, "euler": euler, "zoh_euler": zoh_euler}


def discretize(
    A: Tensor,
    B: Tensor,
    dt: float | Tensor,
    method: str = "zoh",
    *,
    diagonal: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Discretize ``x' = A x + B u`` with step ``dt``; returns ``(Abar, Bbar)``.

    Args:
        A: diagonal ``(..., N)`` eigenvalues, or dense ``(..., N, N)``.
        B: ``(..., N)`` (diagonal) or ``(..., N, M)`` (dense).
        dt: Python number or tensor; diagonal: broadcastable against ``A`` and ``B``;
            dense: scalar or batch shape ``(...)`` broadcastable against ``A.shape[:-2]``, ``B.shape[:-2]``.
        method: ``"zoh"``, ``"bilinear"`` (alias ``"tustin"``), ``"euler"`` (alias ``"forward_euler"``)
            or ``"zoh_euler"`` (Mamba-1: ``exp(dt A)``, ``dt B``). Case-insensitive.
        diagonal: ``True`` / ``False`` to force the layout; ``None`` infers it: dense iff
            ``A.dim() >= 2 and A.shape[-1] == A.shape[-2] and B.dim() >= 2 and B.shape[-2] == A.shape[-1]``,
            otherwise diagonal.

    Returns:
        ``(Abar, Bbar)`` in float32 (float64 if any input is float64; complex likewise).
        Diagonal: ``Abar: broadcast(A, dt)``, ``Bbar: broadcast(A, B, dt)``.
        Dense: ``Abar: (*batch, N, N)``, ``Bbar: (*batch, N, M)``.

    Raises:
        ValueError: unknown ``method``, or shapes that do not fit the (given or inferred) layout.
    """
    return _METHOD_FNS[_resolve_method(method)](A, B, dt, diagonal=diagonal)
