"""DNALM: the causal DNA language model, apps.common.CausalLMModule with bits per base as its metric.

The network predicts a softmax over the whole 12-token vocabulary (HyenaDNA ids, apps.genomics.data),
and the data module ignores every target that is not A/C/G/T. So ``bits_per_base`` is the mean of
-log2 p(next base) over real bases, with p normalised over all 12 tokens: probability the model leaves on
N or the special tokens counts against it, and 2.0 is what a uniform guess over A/C/G/T scores.
"""

from __future__ import annotations

from apps.common import CausalLMModule
from apps.genomics.data import VOCAB_SIZE
from ssm_core import MambaConfig

__all__ = ["DNALM", "small_config"]


def small_config(d_model: int = 128, n_layer: int = 4, layer: str = "Mamba1") -> MambaConfig:
    """The default model: 4 Mamba-1 blocks of width 128 (469k parameters), the 12-token DNA vocabulary."""
    return MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=VOCAB_SIZE, ssm_cfg={"layer": layer})


class DNALM(CausalLMModule):
    """Next-base language model on ssm_core. ``config`` defaults to ``small_config()``; ``chunk_len`` reads
    long windows in pieces with exact gradients (ssm_core.chunked_lm_loss), see configs/long_1m.yaml."""

    unit = "base"

    def __init__(self, config: MambaConfig | None = None, lr: float = 2e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.95), warmup_steps: int = 50, min_lr_ratio: float = 0.1,
                 chunk_len: int | None = None, detach_state: bool = False):
        config = config or small_config()
        if config.vocab_size < VOCAB_SIZE:
            raise ValueError(f"DNALM: config.vocab_size must be at least {VOCAB_SIZE} (the DNA tokenizer's), "
                             f"got {config.vocab_size}")
        super().__init__(config, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         min_lr_ratio=min_lr_ratio, chunk_len=chunk_len, detach_state=detach_state,
                         vocab_size=VOCAB_SIZE)
