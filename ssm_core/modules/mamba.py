"""Mamba-1 mixer: mamba_ssm's ``Mamba`` (same arguments, defaults, init, parameter names)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.complex_scan import complex_scan, complex_state_update, s4d_lin
from ..ops.conv import causal_conv1d_time_major, causal_conv1d_update
from ..ops.selective_scan import fp32, selective_scan_time_major, selective_state_update
from ..state import SSMState
from .delta_hooks import DeltaHooks
from .prefill import prefill_in_pieces, run_in_pieces


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, dt_init_floor: float, **factory) -> Tensor:
    """dt ~ log-uniform[dt_min, dt_max] (floored), returned as softplus^{-1}(dt) for the dt bias."""
    dt = torch.exp(torch.rand(n, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba(DeltaHooks, nn.Module):
    """Selective SSM block (Gu & Dao 2023), one screen:

        x, z = in_proj(u)                      # (batch, L, d_inner) each
        x = silu(conv1d(x))                    # causal, depthwise, width d_conv
        dt, B, C = x_proj(x)                   # input-dependent (selective) parameters
        y = selective_scan(x, dt_proj(dt), A=-exp(A_log), B, C, D, z)   # y *= silu(z); time-major, no transposes
        out = out_proj(y)

    ``selective=False`` is the paper's "S4 (LTI)" layer inside the Mamba block (Table 1): Δ, B, C become
    learned input-independent parameters (Δ = softplus(dt_bias) per channel; B, C per state, shared over
    time and channels like the selective B, C), so the SSM is a fixed convolution (S4D-real A init);
    in_proj, conv1d, gating and out_proj are unchanged.

    ``complex_A=True``: a complex diagonal A with S4D-Lin init (A = -exp(A_log) + i A_imag = -1/2 + i π n),
    complex B, C and state, y = 2 Re <C, h> (ssm_core.ops.complex_scan; the Mamba paper's complex SSM). With
    ``selective=False`` it is the S4D layer inside the Mamba block: B = 1, C ~ CN(0, 1) as (d_state, 2) real
    pairs; selective, x_proj emits B and C as (d_state, 2) pairs each. The SSM state is complex64.

    ``register_delta_hook`` exposes the step size Δ = softplus(dt + dt_bias) of every call (to measure it,
    penalise it, or replace it) without touching the forward when no hook is registered.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,  # accepted for mamba_ssm compatibility; dispatch is in ssm_core.ops
        selective: bool = True,  # False: the LTI ablation (Δ, B, C do not depend on the input)
        complex_A: bool = False,  # True: complex diagonal A (S4D-Lin), complex B, C and state
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx, self.selective, self.complex_A = layer_idx, selective, complex_A
        bc = 2 * d_state if complex_A else d_state  # complex B, C come as (d_state, 2) real pairs

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if selective:
            self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * bc, bias=False, **factory)
            self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
            std = self.dt_rank**-0.5 * dt_scale
            with torch.no_grad():
                if dt_init == "constant":
                    nn.init.constant_(self.dt_proj.weight, std)
                else:
                    nn.init.uniform_(self.dt_proj.weight, -std, std)
                self.dt_proj.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                            device=device))
            self.dt_proj.bias._no_reinit = True
        else:
            # S4D-style init: B = 1, C ~ N(0, 1); Δ log-uniform in [dt_min, dt_max] as in the selective layer
            self.dt_bias = nn.Parameter(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor,
                                                            device=device))
            if complex_A:  # S4D: B = 1 + 0i, C ~ CN(0, 1) (real and imaginary parts of variance 1/2)
                B = torch.stack([torch.ones(d_state), torch.zeros(d_state)], dim=-1)
                C = torch.randn(d_state, 2) * math.sqrt(0.5)
                self.B = nn.Parameter(B.to(device=device, dtype=torch.float32))
                self.C = nn.Parameter(C.to(device=device, dtype=torch.float32))
            else:
                self.B = nn.Parameter(torch.ones(d_state, device=device, dtype=torch.float32))
                self.C = nn.Parameter(torch.randn(d_state, device=device, dtype=torch.float32))
            for p in (self.dt_bias, self.B, self.C):
                p._no_weight_decay = True

        if complex_A:  # S4D-Lin: A = -exp(A_log) + i A_imag = -1/2 + i π n, fp32 whatever the module dtype
            A_log, A_imag = s4d_lin(self.d_inner, d_state, device=device)
            self.A_log = nn.Parameter(A_log)
            self.A_imag = nn.Parameter(A_imag)
            self.A_imag._no_weight_decay = True
        else:  # S4D-real init, kept in fp32 whatever the module dtype
            A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
            self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=torch.float32))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._init_delta_hooks()

    def register_delta_hook(self, hook):
        """Call ``hook(module, delta, u)`` with the step size of every forward and decode step.

        delta: Δ = softplus(dt + dt_bias), fp32 (fp64 for fp64 models), (batch, d_inner, L) in a forward and
        (batch, d_inner) in a decode step, differentiable (a penalty on it trains dt_proj and the bias);
        u: the scan input (after the conv and SiLU), same shape, the module's dtype; Δ·u·B is what a token
        writes into the state. The hook may return a tensor of delta's shape that replaces Δ (later hooks
        see the replacement), or None. When a hook replaces Δ, the scan takes the final Δ as is
        (``delta_softplus=False``, no bias); when none does, the scan computes Δ itself as without hooks, so
        hooks that only observe leave the forward bit-identical (the Δ they see equals the scan's up to
        rounding). Returns a handle whose ``remove()`` unregisters the hook.
        """
        return super().register_delta_hook(hook)

    def _run_delta_hooks(self, dt: Tensor, u: Tensor) -> Tensor | None:
        """dt (pre-bias): (batch, d_inner[, L]) -> the Δ that replaces the scan's own after every delta hook has
        seen it, or None when no hook replaced it."""
        bias = self._dt_bias()
        return self._apply_delta_hooks(F.softplus(fp32(dt) + (bias[:, None] if dt.dim() == 3 else bias)), u)

    def empty_state(self, batch: int, device=None, dtype=None) -> SSMState:
        device = device or self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        return SSMState(
            conv=torch.zeros(batch, self.d_inner, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.d_inner, self.d_state, device=device,
                            dtype=torch.complex64 if self.complex_A else torch.float32),
        )

    def _A(self) -> Tensor:
        """(d_inner, d_state): -exp(A_log), or -exp(A_log) + i A_imag (complex64) with ``complex_A``."""
        A_real = -torch.exp(fp32(self.A_log))
        return torch.complex(A_real, fp32(self.A_imag)) if self.complex_A else A_real

    def forward(self, hidden_states: Tensor, state: SSMState | None = None, return_state: bool = False):
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model) [, SSMState].

        A long CPU prefill (no autograd graph, no delta hook) runs in pieces of ``PREFILL_PIECE`` tokens with
        the conv and SSM states carried: the same result, and every intermediate stays piece-sized, so the cost
        per token does not grow with L (whole-sequence tensors cost page faults and cache misses: 1.2-1.9x per
        token at 32k in one call, docs/benchmarks.md). Delta hooks see a whole call's Δ, so with one registered the
        sequence goes in one piece.
        """
        from ..validate import check_mamba  # the API boundary checks (ssm_core/validate.py)

        check_mamba(self, hidden_states, state)
        if state is None:
            state = self.empty_state(hidden_states.shape[0], hidden_states.device, hidden_states.dtype)
        if prefill_in_pieces(self, hidden_states):
            out, state = run_in_pieces(self._forward, hidden_states, state, self.PREFILL_PIECE, self.d_model)
        else:
            out, state = self._forward(hidden_states, state)
        return (out, state) if return_state else out

    # tokens per piece of a long no-grad CPU forward (measured: docs/benchmarks.md, prefill_flat)
    PREFILL_PIECE = 1024

    def _forward(self, hidden_states: Tensor, state: SSMState) -> tuple[Tensor, SSMState]:
        L = hidden_states.shape[1]
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)
        A = self._A()
        if L == 1:  # decode step: no scan machinery
            y, new_state = self._step(x[:, 0], z[:, 0], A, state)
            return self.out_proj(y.unsqueeze(1)), new_state

        # time-major (batch, L, d_inner) from in_proj to out_proj: no layout copies around the conv and the scan
        x, conv_state = causal_conv1d_time_major(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, initial_states=state.conv, activation="silu",
        )
        dt, B, C = self._dt_B_C(x)
        dt_bias = self._dt_bias()
        if self._delta_hooks and (delta := self._run_delta_hooks(dt.transpose(1, 2), x.transpose(1, 2))) is not None:
            dt, dt_bias = delta.transpose(1, 2), None  # a hook replaced Δ: the scan takes it as is
        if self.complex_A:  # B, C: (d_inner, d_state) time-invariant, or (batch, d_state, L) complex
            B, C = (X if X.dim() == 2 else X.transpose(1, 2) for X in (B, C))
            y, ssm_state = complex_scan(
                x.transpose(1, 2), dt.transpose(1, 2), A, B, C, fp32(self.D), z.transpose(1, 2), delta_bias=dt_bias,
                delta_softplus=dt_bias is not None, return_last_state=True, initial_state=state.ssm,
            )
            return self.out_proj(y.transpose(1, 2)), SSMState(conv_state, ssm_state)
        y, ssm_state = selective_scan_time_major(
            x, dt, A, B, C, fp32(self.D), z, delta_bias=dt_bias, delta_softplus=dt_bias is not None,
            return_last_state=True, initial_state=state.ssm,
        )
        return self.out_proj(y), SSMState(conv_state, ssm_state)

    def _dt_B_C(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (..., d_inner) -> dt (pre-bias, pre-softplus): (..., d_inner); B, C: (..., d_state).
        complex_A: B, C complex64, (d_inner, d_state) time-invariant (LTI) or (..., d_state) per token."""
        if self.complex_A:
            return self._complex_dt_B_C(x)
        if not self.selective:  # LTI: dt = 0 so Δ = softplus(dt_bias); B, C the same at every step
            shape = x.shape[:-1] + (self.d_state,)
            return x.new_zeros(x.shape), self.B.to(x.dtype).expand(shape), self.C.to(x.dtype).expand(shape)
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return dt @ self.dt_proj.weight.t(), B, C  # the dt bias goes in separately, in fp32

    def _complex_dt_B_C(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        def cplx(p: Tensor) -> Tensor:  # (..., d_state, 2) real pairs -> (..., d_state) complex64 (128 for fp64)
            return torch.complex(fp32(p[..., 0]), fp32(p[..., 1]))

        if not self.selective:
            B, C = (cplx(p).expand(self.d_inner, self.d_state) for p in (self.B, self.C))
            return x.new_zeros(x.shape), B, C
        dt, B, C = self.x_proj(x).split([self.dt_rank, 2 * self.d_state, 2 * self.d_state], dim=-1)
        B, C = (cplx(X.unflatten(-1, (self.d_state, 2))) for X in (B, C))
        return dt @ self.dt_proj.weight.t(), B, C

    def _dt_bias(self) -> Tensor:
        return fp32(self.dt_proj.bias if self.selective else self.dt_bias)

    def _step(self, x: Tensor, z: Tensor, A: Tensor, state: SSMState):
        """One token: x, z: (batch, d_inner)."""
        xc, conv_state = causal_conv1d_update(x, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                              "silu", inplace=False)
        dt, B, C = self._dt_B_C(xc)
        dt_bias = self._dt_bias()
        if self._delta_hooks and (delta := self._run_delta_hooks(dt, xc)) is not None:
            dt, dt_bias = delta, None
        if self.complex_A:
            if self.selective:  # this token's (batch, d_state) -> (batch, 1 group, d_state)
                B, C = B.unsqueeze(1), C.unsqueeze(1)
            y, ssm = complex_state_update(state.ssm, xc, dt, A, B, C, fp32(self.D), z, dt_bias=dt_bias,
                                          dt_softplus=dt_bias is not None)
            return y, SSMState(conv_state, ssm)
        y, ssm = selective_state_update(
            state.ssm, xc, dt, A, B, C, fp32(self.D), z, dt_bias=dt_bias,
            dt_softplus=dt_bias is not None, inplace=False,
        )
        return y, SSMState(conv_state, ssm)
