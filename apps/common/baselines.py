"""Same-size baselines: a Transformer (RoPE attention + gated MLP, built from ssm_core's blocks) with
about as many parameters as a given Mamba config, for the "same size, same CPU minutes" comparisons."""

from __future__ import annotations

from dataclasses import replace

import torch

from ssm_core import MambaConfig, MambaLMHeadModel

__all__ = ["count_parameters", "transformer_like"]


def count_parameters(config: MambaConfig) -> int:
    with torch.device("meta"):
        model = MambaLMHeadModel(config)
    return sum(p.numel() for p in model.parameters())


def transformer_like(config: MambaConfig, num_heads: int | None = None, n_layer: int | None = None) -> MambaConfig:
    """An all-attention config (RoPE on the whole head, causal) whose parameter count is within one MLP
    step (GatedMLP sizes are multiples of 128) of ``config``'s. Same d_model, vocabulary and depth by default."""
    d = config.d_model
    heads = num_heads or max(1, d // 64)
    if d % heads:
        raise ValueError(f"transformer_like: d_model={d} is not divisible by num_heads={heads}")
    n = n_layer or config.n_layer
    base = replace(config, n_layer=n, attn_layer_idx=list(range(n)),
                   attn_cfg={"num_heads": heads, "rotary_emb_dim": d // heads, "causal": True},
                   d_intermediate=0, bidirectional=False)
    target = count_parameters(config)
    # GatedMLP rounds its hidden size up to a multiple of 128: search those sizes for the closest count
    sizes = range(128, 16 * d + 129, 128)
    best = min(sizes, key=lambda h: abs(count_parameters(replace(base, d_intermediate=h)) - target))
    no_mlp = count_parameters(base)
    return base if abs(no_mlp - target) <= abs(count_parameters(replace(base, d_intermediate=best)) - target) \
        else replace(base, d_intermediate=best)
