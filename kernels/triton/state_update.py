"""Decode-step selective state update in Triton (Mamba-1 and Mamba-2 layouts), in place.

Semantics are those of ``ssm_core.ops.selective_scan.selective_state_update`` (``inplace=True``),
i.e. mamba_ssm's ``selective_state_update``::

    Δ = softplus(dt + dt_bias) (when asked),  state <- exp(Δ A) state + Δ x B,
    out = <state, C> + D x,  out *= silu(z)

Layouts (``x`` may carry a token axis T after batch, for several tokens in a row):

* Mamba-1: state (batch, dim, N); x, dt, z (batch, dim); A (dim, N); B, C (batch, N) or
  (batch, G, N); D, dt_bias (dim,).
* Mamba-2: state (batch, nheads, headdim, N); x, dt, z (batch, nheads, headdim); A
  (nheads, headdim, N); B, C (batch, G, N); D, dt_bias (nheads, headdim). Broadcast views (e.g. dt
  expanded from (batch, nheads) with stride 0) are fine: strides are passed through.

All Triton: one program per (batch, head, block of headdim rows); the Mamba-1 layout is viewed as
G heads of dim/G rows. The state is read and written in its own dtype; math is fp32 (fp64 for fp64
x). Not differentiable (decode only).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..shape_checks import check_state_update, per_token
from ._common import check_device, dummy, pow2, sum_combine, tl_acc

__all__ = ["selective_state_update_triton"]


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr,
    H, P, N, heads_per_group,
    ss_b, ss_h, ss_p, ss_n,
    sx_b, sx_h, sx_p,
    sdt_b, sdt_h, sdt_p,
    sA_h, sA_p, sA_n,
    sB_b, sB_g, sB_n,
    sC_b, sC_g, sC_n,
    sD_h, sD_p,
    sz_b, sz_h, sz_p,
    sbias_h, sbias_p,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    g = h // heads_per_group
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pmask = p < P
    nmask = n < N
    m2 = pmask[:, None] & nmask[None, :]
    s_ptrs = state_ptr + pid_b * ss_b + h * ss_h + p[:, None] * ss_p + n[None, :] * ss_n
    s = tl.load(s_ptrs, mask=m2, other=0.0).to(ACC)
    xv = tl.load(x_ptr + pid_b * sx_b + h * sx_h + p * sx_p, mask=pmask, other=0.0).to(ACC)
    dt = tl.load(dt_ptr + pid_b * sdt_b + h * sdt_h + p * sdt_p, mask=pmask, other=0.0).to(ACC)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + h * sbias_h + p * sbias_p, mask=pmask, other=0.0).to(ACC)
    if SOFTPLUS:
        e = tl.exp(tl.minimum(dt, 20.0))
        w = 1.0 + e
        lp = tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0))  # log1p(e), Kahan
        dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, lp))
    A = tl.load(A_ptr + h * sA_h + p[:, None] * sA_p + n[None, :] * sA_n, mask=m2, other=0.0).to(ACC)
    Bv = tl.load(B_ptr + pid_b * sB_b + g * sB_g + n * sB_n, mask=nmask, other=0.0).to(ACC)
    Cv = tl.load(C_ptr + pid_b * sC_b + g * sC_g + n * sC_n, mask=nmask, other=0.0).to(ACC)
    s = tl.exp(dt[:, None] * A) * s + (dt * xv)[:, None] * Bv[None, :]
    out = tl.reduce(s * Cv[None, :], 1, sum_combine)
    if HAS_D:
        out += xv * tl.load(D_ptr + h * sD_h + p * sD_p, mask=pmask, other=0.0).to(ACC)
    if HAS_Z:
        zv = tl.load(z_ptr + pid_b * sz_b + h * sz_h + p * sz_p, mask=pmask, other=0.0).to(ACC)
        out = out * zv / (1.0 + tl.exp(-zv))
    tl.store(s_ptrs, s, mask=m2)
    tl.store(out_ptr + (pid_b * H + h) * P + p, out, mask=pmask)


def _update_one(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    """One token; all tensors already in the 4-D (Mamba-2) layout."""
    b, H, P, N = state.shape
    G = B.shape[1]
    out = torch.empty(b, H, P, device=x.device, dtype=x.dtype)
    BN = pow2(N)
    BP = min(pow2(P), max(1, 2048 // BN))
    elems = BP * BN
    _state_update_kernel[(b, H, triton.cdiv(P, BP))](
        state, x, dt, A, B, C,
        D if D is not None else dummy(x), z if z is not None else x,
        dt_bias if dt_bias is not None else dummy(x), out,
        H, P, N, H // G,
        *state.stride(), *x.stride(), *dt.stride(), *A.stride(), *B.stride(), *C.stride(),
        *(D.stride() if D is not None else (0, 0)), *(z if z is not None else x).stride(),
        *(dt_bias.stride() if dt_bias is not None else (0, 0)),
        BLOCK_P=BP, BLOCK_N=BN, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), ACC=tl_acc(x), num_warps=4 if elems >= 1024 else 1,
    )
    return out


def selective_state_update_triton(
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
) -> Tensor:
    """Advance ``state`` in place by one token (or T tokens) and return ``out`` in x's dtype.

    Same layouts and semantics as ssm_core's ``selective_state_update`` with ``inplace=True``.
    """
    name = "selective_state_update_triton"
    several = check_state_update(name, state, x, dt, A, B, C, D, z, dt_bias)
    check_device(state, x, dt, A, B, C, D, z, dt_bias, name=name)
    rows = A.shape[0]

    def step(xt, dtt, Bt, Ct, zt):
        if Bt.dim() == 2:  # no group axis: one group
            Bt, Ct = Bt.unsqueeze(1), Ct.unsqueeze(1)
        if A.dim() == 3:
            return _update_one(state, xt, dtt, A, Bt, Ct, D, zt, dt_bias, dt_softplus)
        G = Bt.shape[1]  # Mamba-1: G heads of dim / G rows, one group per head

        def split(X, lead):
            return None if X is None else X.unflatten(lead, (G, rows // G))

        return _update_one(
            split(state, 1), split(xt, 1), split(dtt, 1), split(A, 0), Bt, Ct,
            split(D, 0), split(zt, 1), split(dt_bias, 0), dt_softplus,
        ).flatten(1)

    return per_token(several, step, x, dt, B, C, z)
