"""Multi-head causal attention with RoPE and a KV cache (mamba_ssm's ``MHA`` arguments and names),
for Jamba-style hybrids (``attn_layer_idx``) and same-size Transformer baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..state import AttentionState
from ..validate import check_attention_state, check_hidden


def rotary(x: Tensor, positions: Tensor, dim: int, base: float) -> Tensor:
    """Rotate the first ``dim`` channels of x: (batch, heads, T, head_dim) (GPT-NeoX half layout)."""
    if dim == 0:
        return x
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim)
    angles = positions.float()[:, None] * inv_freq[None]  # (T, dim/2)
    cos, sin = angles.cos().repeat(1, 2).to(x.dtype), angles.sin().repeat(1, 2).to(x.dtype)
    rot, rest = x[..., :dim], x[..., dim:]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


class MHA(nn.Module):
    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        head_dim: int | None = None,
        mlp_dim: int = 0,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        softmax_scale: float | None = None,
        causal: bool = True,
        layer_idx: int | None = None,
        d_conv: int = 0,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if mlp_dim or d_conv or rotary_emb_interleaved:
            raise ValueError("MHA: mlp_dim, d_conv and rotary_emb_interleaved are not supported by hiss")
        self.num_heads = num_heads
        self.num_heads_kv = num_heads_kv or num_heads
        if num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads={num_heads} must be divisible by num_heads_kv={self.num_heads_kv}")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MHA: embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.head_dim = head_dim or embed_dim // num_heads
        if rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim={rotary_emb_dim} must be even and <= head_dim={self.head_dim}")
        self.softmax_scale, self.causal, self.layer_idx = softmax_scale, causal, layer_idx
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        qkv_dim = self.head_dim * (num_heads + 2 * self.num_heads_kv)
        self.in_proj = nn.Linear(embed_dim, qkv_dim, bias=qkv_proj_bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(self.head_dim * num_heads, embed_dim, bias=out_proj_bias,
                                  device=device, dtype=dtype)

    def forward(self, x: Tensor, state: AttentionState | None = None, return_state: bool = False,
                seqlen_offset: int | None = None):
        """x: (batch, L, embed_dim). The cache length gives the absolute positions of x."""
        check_hidden(self, x, self.in_proj.in_features, self.in_proj.weight.dtype)
        if state is not None:
            check_attention_state(self, state, x.shape[0], self.num_heads_kv, self.head_dim, x.device)
        batch, L, _ = x.shape
        q, k, v = self.in_proj(x).split(
            [self.num_heads * self.head_dim, self.num_heads_kv * self.head_dim,
             self.num_heads_kv * self.head_dim], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        past = 0 if state is None else state.k.shape[2]
        offset = past if seqlen_offset is None else seqlen_offset
        positions = torch.arange(offset, offset + L, device=x.device)
        q = rotary(q, positions, self.rotary_emb_dim, self.rotary_emb_base)
        k = rotary(k, positions, self.rotary_emb_dim, self.rotary_emb_base)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        mask = None
        if self.causal and L > 1:  # query i sees keys up to past + i
            mask = torch.ones(L, past + L, dtype=torch.bool, device=x.device).tril(past)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=self.softmax_scale,
            enable_gqa=self.num_heads != self.num_heads_kv,
        )
        out = self.out_proj(out.transpose(1, 2).flatten(-2))
        return (out, AttentionState(k, v)) if return_state else out

    def empty_state(self, batch: int, device=None, dtype=None) -> AttentionState:
        device = device or self.in_proj.weight.device
        dtype = dtype or self.in_proj.weight.dtype
        empty = torch.zeros(batch, self.num_heads_kv, 0, self.head_dim, device=device, dtype=dtype)
        return AttentionState(empty, empty.clone())
