"""How selective is Δ? The step size of the Mamba layers, read (and floored) through their ``register_delta_hook``.

Δ·x is what a token writes into the state (times B); exp(A·Δ) is how much of the state survives it. A layer
that extrapolates must write the few tokens that matter with a large Δ and ignore the rest with Δ near 0.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from ssm_core import MambaLMHeadModel
from ssm_core.modules import Mamba, Mamba2

from .evaluate import correct
from .tasks import EVAL_SEED, MAKE_BATCH, NOISE, TRIGGER, write_mask

__all__ = ["capture_delta", "delta_selectivity", "floor_accuracy"]


@contextmanager
def capture_delta(model: torch.nn.Module, floor: float | None = None, mamba2: bool = False):
    """Within the block, each selective Mamba-1 layer's forward appends (Δ, x) to the yielded list (one entry
    per layer call, in call order; gradients flow): its step size Δ = softplus(dt + dt_bias) and the scan
    input x (after the conv), both (batch, L, d_inner) ((batch, d_inner) in a decode step).
    ``floor``: an intervention, not a measurement: every Δ below it is set to exactly 0 (no write, no decay).
    ``mamba2``: the Mamba-2 layers too (for a penalty on Δ): their Δ is one per head, (batch, L, nheads), and
    x is (batch, L, nheads, headdim); the analyses below read Mamba-1 layers only."""
    deltas: list[tuple[Tensor, Tensor]] = []

    def hook(layer: Mamba | Mamba2, delta: Tensor, x: Tensor) -> Tensor | None:
        if floor is not None:
            delta = torch.where(delta < floor, torch.zeros_like(delta), delta)
        # Mamba-1's hook layout is the scan's (batch, d_inner, L); the analyses index positions: (batch, L, d_inner)
        mamba1 = isinstance(layer, Mamba)
        deltas.append((delta.transpose(1, 2), x.transpose(1, 2)) if mamba1 and delta.dim() == 3 else (delta, x))
        return delta if floor is not None else None

    # LTI layers have no selection to measure
    layers = [m for m in model.modules()
              if (isinstance(m, Mamba) and m.selective) or (mamba2 and isinstance(m, Mamba2))]
    handles = [m.register_delta_hook(hook) for m in layers]
    try:
        yield deltas
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def delta_selectivity(model: MambaLMHeadModel, task: str, L: int, n: int = 64, seed: int = EVAL_SEED) -> list[dict]:
    """Per Mamba layer, the channel that best separates write positions from the rest, by what a token
    writes into the state, |Δ·x| (Δ the step size, x the scan input; B is shared by all channels).

    Each ignored token adds its |Δ·x|·B to the state and decays it by exp(A·Δ), so a write survives about
    ``horizon`` = |Δ·x|(write) / mean |Δ·x|(other) ignored tokens before their sum matches it; ``delta_write``
    and ``delta_other`` give Δ alone (a layer can select through Δ or through x). The write value is the
    largest one from a write position to the d_conv - 1 positions after it (the conv still sees the token
    there, so a layer may write it a step or two late); those positions are not "other"."""
    ids, _ = MAKE_BATCH[task](n, L, torch.Generator().manual_seed(seed))
    write = write_mask(task, ids)
    near = write.clone()
    for k in range(1, 4):  # d_conv - 1 positions after a write still see it through the conv
        near[:, k:] |= write[:, :-k]
    other = ~near & (ids != TRIGGER if task == "induction" else ids == NOISE)
    with capture_delta(model) as deltas:
        model(ids)

    def late(v: Tensor) -> Tensor:  # max over v[t : t + 4]
        return F.max_pool1d(F.pad(v.transpose(1, 2), (0, 3)), 4, stride=1).transpose(1, 2)

    rows = []
    for i, (delta, x) in enumerate(deltas):
        gain = (delta * x.float()).abs()
        on, off = late(gain)[write].mean(0), gain[other].mean(0)  # (d_inner,)
        # Δ can underflow to exactly 0: a channel that writes nothing anywhere has horizon 0, not 0/0
        ratio = torch.where(off > 0, on / off.clamp_min(1e-38), torch.where(on > 0, math.inf, 0.0))
        infinite = torch.isinf(ratio)  # several channels may never write elsewhere: take the strongest writer
        ch = int(torch.where(infinite, on, -1.0).argmax()) if infinite.any() else int(ratio.argmax())
        rows.append({"layer": i, "channel": ch, "delta_write": float(late(delta)[write].mean(0)[ch]),
                     "delta_other": float(delta[other].mean(0)[ch]), "horizon": float(ratio[ch])})
    return rows


@torch.no_grad()
def floor_accuracy(model: MambaLMHeadModel, task: str, L: int, n: int, floor: float,
                   chunk_len: int = 8192) -> tuple[float, float]:
    """(accuracy, accuracy with every Δ below ``floor`` set to 0) on n held-out sequences of length L: how
    much of the model's memory rests on small Δ (sequences seeded with EVAL_SEED + L, as in evaluation)."""
    ids, targets = MAKE_BATCH[task](n, L, torch.Generator().manual_seed(EVAL_SEED + L))
    plain = correct(model, ids, targets, chunk_len) / targets.numel()
    with capture_delta(model, floor=floor):
        floored = correct(model, ids, targets, chunk_len) / targets.numel()
    return plain, floored
