"""Complex diagonal scan (S4D / the Mamba paper's complex SSM): the chunked path and its reference twin.

Math (per batch b, channel d, state n; Δ = softplus(delta + delta_bias) when asked; A, B, C, h complex):

    h_t = exp(Δ_t A) * h_{t-1} + Δ_t B_t u_t            (zero-order hold on A, Euler on B, as mamba_ssm)
    y_t = 2 Re <C_t, h_t> + D u_t,   y_t *= silu(z_t) if z is given

The factor 2 is mamba_ssm's convention (``selective_scan_ref``: ``y = y.real * 2``): the state keeps one
of each conjugate pair of a real system, whose other half contributes the same real part.

Layouts (mamba_ssm's ``selective_scan_fn`` with complex A):
    u, delta, z: (batch, dim, L) real;  A: (dim, N) complex;  D, delta_bias: (dim,) real;
    B, C: complex, each either time-invariant (dim, N) or input-dependent (batch, N, L) / (batch, G, N, L);
    initial_state / last_state: (batch, dim, N) complex64 (complex128 for fp64 u).

Complex values are torch complex tensors in this API (complex64 / complex128): autograd handles them and
gradients follow PyTorch's convention (for a real loss, ``dL/dRe + i dL/dIm``). The compiled CPU kernel
(kernels/csrc/complex_scan_cpu.h) takes the ``view_as_real`` pairs and returns gradients in that convention.
Discretization and state are fp32 / complex64 whatever the input dtype (fp64 stays fp64).

S4D-Lin initialisation (Gu et al. 2022, "On the Parameterization and Initialization of Diagonal State Space
Models"): A_n = -1/2 + i π n, n = 0..N-1, parametrised as A = -exp(A_log) + i A_imag (see ``s4d_lin``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kernels.shape_checks import check_complex_scan

from .backend import fast_path
from .chunked import chunked_recurrence, linear_scan, pick_chunk_len
from .selective_scan import _discretize, _output, acc_dtype

__all__ = ["complex_scan", "complex_scan_ref", "complex_state_update", "s4d_lin", "complex_dtype"]


def complex_dtype(x: Tensor) -> torch.dtype:
    """State / compute dtype for real input x: complex128 for fp64, else complex64."""
    return torch.complex128 if acc_dtype(x) == torch.float64 else torch.complex64


def s4d_lin(dim: int, N: int, device=None) -> tuple[Tensor, Tensor]:
    """S4D-Lin init as the parameters (A_log, A_imag), each (dim, N) fp32: A = -exp(A_log) + i A_imag
    = -1/2 + i π n for n = 0..N-1."""
    A_log = torch.full((dim, N), math.log(0.5), device=device, dtype=torch.float32)
    A_imag = (math.pi * torch.arange(N, device=device, dtype=torch.float32)).repeat(dim, 1)
    return A_log, A_imag


def _rows(X: Tensor, dim: int, cdt: torch.dtype) -> Tensor:
    """B / C -> broadcastable against (batch, dim, T, N): (dim, N) -> (1, dim, 1, N); (batch, N, T) ->
    (batch, 1, T, N); (batch, G, N, T) -> (batch, dim, T, N)."""
    X = X.to(cdt)
    if X.dim() == 2:
        return X[None, :, None, :]
    if X.dim() == 3:
        return X.unsqueeze(1).transpose(-1, -2)
    return X.repeat_interleave(dim // X.shape[1], dim=1).transpose(-1, -2)


def _scan_chunk(u, delta, A, B, C, D, z, delta_bias, h0, *, delta_softplus: bool):
    """One chunk, parallel in time (a linear scan over (batch, dim, T, N), complex).
    Returns y: (batch, dim, T) real and h_T: (batch, dim, N) complex."""
    dim = u.shape[1]
    dt = _discretize(delta, delta_bias, delta_softplus)  # (b, d, T)
    cdt = complex_dtype(dt)
    a = torch.exp(dt.unsqueeze(-1) * A.to(cdt)[:, None, :])  # (b, d, T, N)
    x = (dt * u.to(dt.dtype)).unsqueeze(-1) * _rows(B, dim, cdt)
    x = x.expand(a.shape)
    x = torch.cat([x[:, :, :1] + a[:, :, :1] * h0.unsqueeze(2), x[:, :, 1:]], dim=2)
    h = linear_scan(a, x, dim=2)
    y = 2 * (h * _rows(C, dim, cdt)).real.sum(-1)
    return _output(y, u, D, z), h[:, :, -1].clone()


def complex_scan(
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
    """Complex diagonal scan (see the module doc for the math and layouts).

    ``backend`` as in ``selective_scan``: "auto" (compiled CPU kernel for CPU tensors; CUDA has no complex
    kernel and takes this PyTorch path), "ref", "cpu"; None reads $HISS_BACKEND. The PyTorch path runs chunk
    by chunk and recomputes each chunk in backward (memory: the inputs plus one state per chunk).
    Gradients reach every input, ``initial_state`` included, and flow from a loss on ``last_state``.

    Returns ``out: (batch, dim, L)`` in u's dtype, and ``last_state: (batch, dim, N)`` complex when
    ``return_last_state``.
    """
    b_var, c_var = check_complex_scan("complex_scan", u, delta, A, B, C, D, z, delta_bias, initial_state)
    kernel = fast_path(backend, u.device, "complex_scan")
    if kernel is not None:
        return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, initial_state)
    batch, dim, L = u.shape
    N = A.shape[1]
    cdt = complex_dtype(u)
    h0 = u.new_zeros(batch, dim, N, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    T = chunk_len or pick_chunk_len(L, 2 * batch * dim * N)
    seq = [(u, 2), (delta, 2), (z, 2)] + [(X, -1) for X, var in ((B, b_var), (C, c_var)) if var]
    params = [A, D, delta_bias] + [X for X, var in ((B, b_var), (C, c_var)) if not var]

    def step(seq_, params_, h):
        u_, delta_, z_, *bc_seq = seq_
        A_, D_, bias_, *bc_par = params_
        it_seq, it_par = iter(bc_seq), iter(bc_par)
        B_ = next(it_seq) if b_var else next(it_par)
        C_ = next(it_seq) if c_var else next(it_par)
        return _scan_chunk(u_, delta_, A_, B_, C_, D_, z_, bias_, h, delta_softplus=delta_softplus)

    y, last = chunked_recurrence(step, seq=seq, params=params, h0=h0, length=L, chunk_len=T, out_dim=2)
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y


def complex_scan_ref(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
    return_last_state=False, initial_state=None,
):
    """Reference twin: the plain sequential recurrence, one time step at a time (slow; for tests)."""
    check_complex_scan("complex_scan_ref", u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, dim, L = u.shape
    dt = _discretize(delta, delta_bias, delta_softplus)
    cdt = complex_dtype(dt)
    Bx, Cx = _rows(B, dim, cdt), _rows(C, dim, cdt)  # (.., T|1, N)
    h = u.new_zeros(batch, dim, A.shape[1], dtype=cdt) if initial_state is None else initial_state.to(cdt)
    ys = []
    for t in range(L):
        Bt, Ct = (X[:, :, t if X.shape[2] > 1 else 0] for X in (Bx, Cx))
        h = torch.exp(dt[:, :, t, None] * A.to(cdt)) * h + (dt[:, :, t] * u[:, :, t].to(dt.dtype))[..., None] * Bt
        ys.append(2 * (h * Ct).real.sum(-1))
    y = _output(torch.stack(ys, dim=-1), u, D, z).to(u.dtype)
    return (y, h) if return_last_state else y


def complex_state_update(
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
) -> tuple[Tensor, Tensor]:
    """One decode step of the complex scan, functional and differentiable: returns (out, new_state).

    state: (batch, dim, N) complex; x, dt, z: (batch, dim) real; A: (dim, N) complex; B, C complex, each
    (dim, N) (time-invariant) or this token's (batch, G, N) (G = 1 for ungrouped); D, dt_bias: (dim,).
    out: (batch, dim) in x's dtype.
    Equal to one step of ``complex_scan`` (the same formula, the same dtypes).
    """
    batch, dim = x.shape
    delta = _discretize(dt.unsqueeze(-1), dt_bias, dt_softplus).squeeze(-1)  # (batch, dim)
    cdt = complex_dtype(delta)

    def rows(X):
        X = X.to(cdt)  # (dim, N) time-invariant as is; (batch, G, N) -> (batch, dim, N)
        return X if X.dim() == 2 else X.repeat_interleave(dim // X.shape[1], dim=1)

    new_state = torch.exp(delta.unsqueeze(-1) * A.to(cdt)) * state.to(cdt) + \
        (delta * x.to(delta.dtype)).unsqueeze(-1) * rows(B)
    y = 2 * (new_state * rows(C)).real.sum(-1)
    return _output(y.unsqueeze(-1), x.unsqueeze(-1), D, None if z is None else z.unsqueeze(-1)).squeeze(-1).to(
        x.dtype), new_state
