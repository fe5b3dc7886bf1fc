"""Mamba-2 mixer: mamba_ssm's ``Mamba2`` (same arguments, defaults, init, parameter names)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.conv import causal_conv1d, causal_conv1d_time_major, causal_conv1d_update
from ..ops.norm import RMSNormGated
from ..ops.selective_scan import fp32, selective_state_update
from ..ops.ssd import mamba_chunk_scan_combined
from ..state import SSMState
from ..validate import check_mamba2
from .delta_hooks import DeltaHooks
from .mamba import inverse_softplus_dt
from .prefill import prefill_in_pieces, run_in_pieces


def _transpose_tiled(t: Tensor, tile: int = 128) -> Tensor:
    """(b, m, n) -> contiguous (b, n, m), copied in tiles of ``tile`` rows of t. A plain ``.contiguous()``
    of the transposed view reads with a stride of n elements: at n = 1024 (a power of two) every read maps to
    the same cache sets and the copy ran 4-5x slower (14 ms against 3 ms for 1792 x 1024 fp32)."""
    b, m, n = t.shape
    out = t.new_empty(b, n, m)
    for s in range(0, m, tile):
        out[:, :, s: s + tile].copy_(t[:, s: s + tile].transpose(1, 2))
    return out


class _Transpose(torch.autograd.Function):
    """``_transpose_tiled`` under autograd (its backward is the same copy the other way): the layout change
    between the conv's channel-major (b, d, L) and the time-major (b, L, d) of in_proj and the SSD."""

    @staticmethod
    def forward(ctx, t):
        return _transpose_tiled(t)

    @staticmethod
    def backward(ctx, g):
        return _transpose_tiled(g)


class Mamba2(DeltaHooks, nn.Module):
    """SSD block (Dao & Gu 2024): one projection gives z, x, B, C, dt; a short conv over (x, B, C);
    a scalar-per-head A; gated RMSNorm y = norm(y * silu(z)); out_proj. With d_ssm < d_inner the
    remaining channels form a gated MLP branch, as in mamba_ssm.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        norm_eps: float = 1e-5,  # eps of the gated output norm (fixed at 1e-5 in mamba_ssm; HF configs vary)
        use_mem_eff_path: bool = True,  # accepted for mamba_ssm compatibility
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.headdim, self.ngroups = headdim, ngroups
        if self.d_ssm > self.d_inner:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} exceeds d_inner=expand*d_model={self.d_inner}")
        if self.d_ssm % headdim:
            raise ValueError(f"Mamba2: d_ssm={self.d_ssm} must be divisible by headdim={headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"Mamba2: nheads={self.nheads} must be divisible by ngroups={ngroups}")
        self.D_has_hdim, self.rmsnorm, self.norm_before_gate = D_has_hdim, rmsnorm, norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size, self.layer_idx = chunk_size, layer_idx

        self.conv_dim = self.d_ssm + 2 * ngroups * d_state
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)

        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, dt_min, dt_max, dt_init_floor, device=device))
        self.dt_bias._no_weight_decay = True
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"Mamba2: A_init_range must be 0 < lo <= hi, got {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=norm_eps, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self._init_delta_hooks()

    def register_delta_hook(self, hook):
        """Call ``hook(module, delta, u)`` with the step size of every forward and decode step.

        delta: Δ = softplus(dt + dt_bias) clamped to dt_limit, fp32, one per head: (batch, L, nheads) in a forward,
        (batch, nheads) in a decode step, differentiable (a penalty on it trains in_proj's dt rows and the bias);
        u: the SSM input x after the conv, (batch, L, nheads, headdim) / (batch, nheads, headdim). A head ignores a
        token when its Δ is ~0: exp(A Δ) ~ 1 keeps the state and Δ x B ~ 0 adds nothing. A hook may return a
        replacement Δ of delta's shape (the SSD then takes it as is: no softplus, bias or clamp), or None;
        observing hooks leave the forward bit-identical. Returns a handle whose ``remove()`` unregisters it."""
        return super().register_delta_hook(hook)

    def _delta(self, dt: Tensor) -> Tensor:
        delta = F.softplus(fp32(dt) + fp32(self.dt_bias))
        if self.dt_limit != (0.0, float("inf")):
            delta = delta.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        return delta

    @property
    def d_mlp(self) -> int:
        return self.d_inner - self.d_ssm

    def empty_state(self, batch: int, device=None, dtype=None) -> SSMState:
        device = device or self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        return SSMState(
            conv=torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype),
            ssm=torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32),
        )

    def forward(self, u: Tensor, state: SSMState | None = None, return_state: bool = False,
                seq_idx: Tensor | None = None):
        """u: (batch, L, d_model) -> (batch, L, d_model) [, SSMState]. seq_idx: (batch, L) packing ids.

        A long CPU prefill (no autograd graph, no seq_idx, no delta hook) runs in pieces of ``PREFILL_PIECE`` tokens per
        sequence with the conv and SSM states carried: the same result (pieces start on the SSD's block
        boundaries), and every intermediate stays piece-sized, so the cost per token does not grow with L
        (whole-sequence tensors cost page faults and cache misses: 1.4x per token at 32k, docs/benchmarks.md).
        """
        check_mamba2(self, u, state, seq_idx)
        if state is None:
            state = self.empty_state(u.shape[0], u.device, u.dtype)
        if seq_idx is None and prefill_in_pieces(self, u):
            out, state = run_in_pieces(lambda p, s: self._forward(p, s, None), u, state, self.PREFILL_PIECE,
                                       self.d_model)
        else:
            out, state = self._forward(u, state, seq_idx)
        return (out, state) if return_state else out

    # tokens per piece of a long no-grad CPU forward: a multiple of the SSD's block (ssd.CPU_BLOCK), measured
    PREFILL_PIECE = 1024

    def _forward(self, u: Tensor, state: SSMState, seq_idx: Tensor | None):
        batch, L, _ = u.shape
        zxbcdt = self.in_proj(u)
        z0, x0, z, xBC, dt = zxbcdt.split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        A = -torch.exp(fp32(self.A_log))
        D = fp32(self.D).view(self.nheads, self.headdim) if self.D_has_hdim else fp32(self.D)
        weight = self.conv1d.weight.squeeze(1)
        if L == 1 and seq_idx is None:  # decode step: no scan machinery
            y, conv_state, ssm_state = self._step(xBC[:, 0], dt[:, 0], z[:, 0], A, D, state)
        else:
            # in_proj and the SSD work time-major (batch, L, conv_dim). On CPU the conv does too (shifted row
            # ranges: no layout copies); the kernels (seq_idx, GPU) work channel-major (batch, conv_dim, L): one
            # tiled copy each way there, so that no op reads x, B, C or their gradients through a transposed view
            # (a strided gather, 3-10x slower per pass at L = 1024)
            if u.device.type == "cpu" and seq_idx is None:
                xBC, conv_state = causal_conv1d_time_major(xBC, weight, self.conv1d.bias, state.conv, "silu")
            else:
                xBC, conv_state = causal_conv1d(
                    _Transpose.apply(xBC), weight, self.conv1d.bias, seq_idx=seq_idx,
                    initial_states=state.conv, return_final_states=True, activation="silu",
                )
                xBC = _Transpose.apply(xBC)
            x, B, C = xBC.split(
                [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
            x = x.unflatten(-1, (self.nheads, self.headdim))
            dt_args = {"dt_bias": self.dt_bias, "dt_softplus": True, "dt_limit": self.dt_limit}
            if self._delta_hooks and (delta := self._apply_delta_hooks(self._delta(dt), x)) is not None:
                dt, dt_args = delta, {"dt_bias": None, "dt_softplus": False, "dt_limit": (0.0, float("inf"))}
            y, ssm_state = mamba_chunk_scan_combined(
                x, dt, A, B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                chunk_size=self.chunk_size, D=D,
                z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
                initial_states=state.ssm, seq_idx=seq_idx, return_final_states=True, **dt_args,
            )
            y = y.flatten(-2)
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y), SSMState(conv_state, ssm_state)

    def _step(self, xBC: Tensor, dt: Tensor, z: Tensor, A: Tensor, D: Tensor, state: SSMState):
        """One token: xBC: (batch, conv_dim), dt: (batch, nheads), z: (batch, d_ssm)."""
        batch, P, N = xBC.shape[0], self.headdim, self.d_state
        xBC, conv_state = causal_conv1d_update(xBC, state.conv, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                               "silu", inplace=False)
        x, B, C = xBC.split([self.d_ssm, self.ngroups * N, self.ngroups * N], dim=-1)
        dt = self._delta(dt)
        if self._delta_hooks and (delta := self._apply_delta_hooks(dt, x.view(batch, self.nheads, P))) is not None:
            dt = delta
        y, ssm_state = selective_state_update(
            state.ssm, x.view(batch, self.nheads, P), dt[..., None].expand(-1, -1, P),
            A[:, None, None].expand(-1, P, N), B.view(batch, self.ngroups, N), C.view(batch, self.ngroups, N),
            D[:, None].expand(-1, P) if D.dim() == 1 else D,
            z=None if self.rmsnorm else z.view(batch, self.nheads, P), inplace=False,
        )
        return y.reshape(batch, 1, self.d_ssm), conv_state, ssm_state
