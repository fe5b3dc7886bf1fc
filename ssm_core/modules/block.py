"""Pre-norm residual block: x = x + mixer(norm(x)) [+ mlp(norm2(x))], mamba_ssm's ``Block`` maths
(its fused add+norm ordering is the same computation written differently)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..validate import check_hidden


class Block(nn.Module):
    def __init__(self, dim: int, mixer: nn.Module, norm: nn.Module, mlp: nn.Module | None = None,
                 norm2: nn.Module | None = None, residual_in_fp32: bool = True):
        super().__init__()
        self.dim, self.norm, self.mixer = dim, norm, mixer
        if mlp is not None:
            self.norm2, self.mlp = norm2, mlp
        else:
            self.mlp = None
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, x: Tensor, state=None, return_state: bool = False, **mixer_kwargs):
        """x: (batch, L, dim) residual stream, any floating dtype -> same [, new mixer state]."""
        check_hidden(self, x, self.dim)  # the mixer checks the state; any float dtype: x is cast for the norm
        if self.residual_in_fp32:
            x = x.to(torch.promote_types(x.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays
        h = self.norm(x.to(self.norm.weight.dtype))
        new_state = None
        if state is not None or return_state:
            h, new_state = self.mixer(h, state=state, return_state=True, **mixer_kwargs)
        else:
            h = self.mixer(h, **mixer_kwargs)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x.to(self.norm2.weight.dtype)))
        return (x, new_state) if return_state else x
