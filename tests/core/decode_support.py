"""Shared by the compiled decode step's tests (test_fast_decode.py, test_int8_decode.py): a small vocabulary,
token ids, the relative error, models moved off their structured init, and the reference twin (the module
path, one token at a time)."""

from __future__ import annotations

import torch

from ssm_core import MambaConfig, MambaLMHeadModel

VOCAB = 61  # padded to 64: logits have padding columns


def perturbed_model(config: dict, seed: int, noise_seed: int) -> MambaLMHeadModel:
    """An fp32 model of ``config`` (vocabulary VOCAB) moved off the structured init, and peaked enough that
    argmaxes are not near-ties."""
    torch.manual_seed(seed)
    m = MambaLMHeadModel(MambaConfig(vocab_size=VOCAB, **config)).eval()
    g = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        m.backbone.embedding.weight.mul_(4)
    return m


def ids_for(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def module_steps(model, ids, prefix):
    """The reference twin: the module path, one token at a time from the prefix's state."""
    state = model(ids[:, :prefix], return_state=True).state
    outs = []
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t : t + 1], state=state, return_state=True)
        outs.append(out.logits[:, 0])
        state = out.state
    return torch.stack(outs, 1), state
