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
    step (multiples of 8 hidden units) of ``config``'s. Same d_model, vocabulary and depth by default."""
    d = config.d_model
    heads = num_heads or max(1, d // 64)
    if d % heads:
        raise ValueError(f"transformer_like: d_model={d} is not divisible by num_heads={heads}")
    n = n_layer or config.n_layer
    base = replace(config, n_layer=n, attn_layer_idx=list(range(n)),
                   attn_cfg={"num_heads": heads, "rotary_emb_dim": d // heads, "causal": True},
                   d_intermediate=0, bidirectional=False)
    target = count_parameters(config)
    without_mlp = count_parameters(base)
    per_hidden = 3 * d * n  # GatedMLP: fc1 (d -> 2h) + fc2 (h -> d), no biases
    hidden = max(8, round((target - without_mlp) / per_hidden / 8) * 8)
    return replace(base, d_intermediate=hidden)
