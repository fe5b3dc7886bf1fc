"""Vision Mamba's "bimamba v2" mixer (Zhu et al. 2024, hustvl/Vim): one in/out projection, two scans.

    x, z = in_proj(u)                                           # shared by both directions
    y_f  = inner(x, z; conv1d, x_proj, dt_proj, A_log, D)              # forwards over the tokens
    y_b  = flip(inner(flip(x), flip(z); conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b))   # backwards
    out  = out_proj((y_f + y_b) / 2)          # hustvl's "div2" (if_devide_out); divide_out=False adds

``inner`` is Mamba-1's selective path (causal depthwise conv + SiLU, selective scan with D and the SiLU(z)
gate), run through ssm_core's ``causal_conv1d_time_major`` and ``selective_scan_time_major`` ops (no
transposes), so the compiled CPU kernels apply (and on a GPU the scan's Triton kernel). Parameter names are
hustvl's, so its checkpoints load key for key. Not causal: no streaming state. Unlike
``Bidirectional(Mamba, Mamba)``, the two directions share in_proj and out_proj.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops.conv import causal_conv1d_time_major
from ..ops.selective_scan import fp32, selective_scan_time_major
from .mamba import Mamba, inverse_softplus_dt

__all__ = ["BiMambaV2"]


class BiMambaV2(Mamba):
    """Mamba's arguments and initialisation; the backward direction gets its own conv1d_b, x_proj_b,
    dt_proj_b, A_b_log, D_b with the same initialisation as the forward ones (hustvl's code leaves dt_proj_b
    at nn.Linear's default init; pretrained checkpoints overwrite both)."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 divide_out: bool = True, layer_idx: int | None = None, device=None, dtype=None, **kwargs):
        if kwargs.get("selective", True) is False:
            raise ValueError("BiMambaV2: the LTI ablation (selective=False) is not supported")
        kwargs.pop("selective", None)
        kwargs.pop("use_fast_path", None)
        if kwargs:
            raise TypeError(f"BiMambaV2: unexpected arguments {sorted(kwargs)}")
        super().__init__(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale,
                         dt_init_floor, conv_bias, bias, layer_idx=layer_idx, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.divide_out = divide_out
        self.conv1d_b = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                  bias=conv_bias, **factory)
        self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        std = self.dt_rank**-0.5 * dt_scale
        with torch.no_grad():
            if dt_init == "constant":
                nn.init.constant_(self.dt_proj_b.weight, std)
            else:
                nn.init.uniform_(self.dt_proj_b.weight, -std, std)
            self.dt_proj_b.bias.copy_(inverse_softplus_dt(self.d_inner, dt_min, dt_max, dt_init_floor, device=device))
        self.dt_proj_b.bias._no_reinit = True
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_b_log = nn.Parameter(torch.log(A))
        self.A_b_log._no_weight_decay = True
        self.D_b = nn.Parameter(torch.ones(self.d_inner, device=device, dtype=torch.float32))
        self.D_b._no_weight_decay = True

    def forward(self, hidden_states: Tensor, state=None, return_state: bool = False) -> Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model).

        Both directions run as one conv and one scan over 2 * d_inner channels: the backward half holds the
        time-reversed x and z, and B, C enter as two groups (the scan's grouped layout), so the result is the
        two separate passes' exactly, in half the kernel calls."""
        if state is not None or return_state:
            raise ValueError("BiMambaV2 sees the whole sequence in both directions and has no streaming state")
        R, N = self.dt_rank, self.d_state
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (batch, L, d_inner) each
        # time-major all the way to the scan (the time-major conv: no per-row set-up, which dominates at the
        # short token counts of images); split / chunk rather than slices, whose backward fills zeros
        x2 = torch.cat([x, x.flip(1)], dim=-1)  # (batch, L, 2E): forward | reversed
        conv_w = torch.cat([self.conv1d.weight, self.conv1d_b.weight]).squeeze(1)
        conv_b = None if self.conv1d.bias is None else torch.cat([self.conv1d.bias, self.conv1d_b.bias])
        xc, _ = causal_conv1d_time_major(x2, conv_w, conv_b, activation="silu")  # (batch, L, 2E)
        xc_f, xc_b = xc.chunk(2, dim=-1)
        dt_f, B_f, C_f = self.x_proj(xc_f).split([R, N, N], dim=-1)  # (batch, L, R | N | N)
        dt_b, B_b, C_b = self.x_proj_b(xc_b).split([R, N, N], dim=-1)
        dt = torch.cat([dt_f @ self.dt_proj.weight.t(), dt_b @ self.dt_proj_b.weight.t()], -1)  # (batch, L, 2E)
        B = torch.stack([B_f, B_b], dim=2)  # (batch, L, 2, N): the two directions as two groups
        C = torch.stack([C_f, C_b], dim=2)
        z2 = torch.cat([z, z.flip(1)], dim=-1)
        A = -torch.exp(torch.cat([fp32(self.A_log), fp32(self.A_b_log)]))
        D = torch.cat([fp32(self.D), fp32(self.D_b)])
        dt_bias = torch.cat([fp32(self.dt_proj.bias), fp32(self.dt_proj_b.bias)])
        y = selective_scan_time_major(xc, dt, A, B, C, D, z2, delta_bias=dt_bias, delta_softplus=True)  # (batch, L, 2E)
        y_f, y_b = y.chunk(2, dim=-1)
        y = y_f + y_b.flip(1)
        if self.divide_out:
            y = y / 2
        return self.out_proj(y)

    def empty_state(self, *args, **kwargs):
        raise ValueError("BiMambaV2 has no streaming state")
