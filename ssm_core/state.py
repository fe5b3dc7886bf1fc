"""One state API for every block and model.

Every mixer takes ``forward(x, state=None, return_state=False)``. A state is a small frozen-shape
record per layer (the conv window and the SSM state; a key/value cache for attention layers).
States are values, never mutated in place: a forward returns a new one, and gradients flow
through it, which is what truncated BPTT and exact chunked training need.

A *state cartridge* is a state saved to a safetensors file together with the model config, so a
long prompt can be read once and continued later without re-reading it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from torch import Tensor

from .io import atomic_write

__all__ = ["SSMState", "AttentionState", "ModelState", "save_state", "load_state"]

_FORMAT = "hiss-state-v1"


@dataclass
class SSMState:
    """State of one Mamba / Mamba-2 mixer.

    conv: (batch, conv_dim, d_conv - 1), the last inputs of the short convolution.
    ssm: (batch, d_inner, d_state) for Mamba-1, (batch, nheads, headdim, d_state) for Mamba-2; fp32.
    """

    conv: Tensor
    ssm: Tensor

    def detach(self) -> SSMState:
        return SSMState(self.conv.detach(), self.ssm.detach())


@dataclass
class AttentionState:
    """Key/value cache of one attention layer: k, v: (batch, nheads_kv, T, head_dim). Grows with T."""

    k: Tensor
    v: Tensor

    def detach(self) -> AttentionState:
        return AttentionState(self.k.detach(), self.v.detach())


@dataclass
class ModelState:
    """Per-layer states of a whole model plus how many tokens it has consumed."""

    layers: list = field(default_factory=list)
    seqlen_offset: int = 0

    def detach(self) -> ModelState:
        """Cut the graph (truncated BPTT): same values, no gradient history."""
        return ModelState([s.detach() for s in self.layers], self.seqlen_offset)

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for i, s in enumerate(self.layers):
            for f in fields(s):
                out[f"layers.{i}.{type(s).__name__}.{f.name}"] = getattr(s, f.name)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def save_state(path: str | os.PathLike, state: ModelState, config) -> None:
    """Write a state cartridge (safetensors + the model config in its metadata), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors().items()}
    meta = {"format": _FORMAT, "config": config.to_json(), "seqlen_offset": str(state.seqlen_offset)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str | os.PathLike, config, device=None) -> ModelState:
    """Read a state cartridge written for a model with this ``config``; a mismatch is a ValueError."""
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path}: not a hiss state cartridge (format={meta.get('format')!r})")
        saved = json.loads(meta["config"])
        mine = json.loads(config.to_json())
        diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
        if diff:
            detail = ", ".join(f"{k}: cartridge {saved.get(k)!r} vs model {mine.get(k)!r}" for k in diff)
            raise ValueError(f"{path}: state cartridge was saved for a different model ({detail})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    by_layer: dict[int, dict[str, Tensor]] = {}
    kinds: dict[int, str] = {}
    for key, t in tensors.items():
        _, i, kind, name = key.split(".")
        by_layer.setdefault(int(i), {})[name] = t.to(device) if device is not None else t
        kinds[int(i)] = kind
    cls = {"SSMState": SSMState, "AttentionState": AttentionState}
    layers = [cls[kinds[i]](**by_layer[i]) for i in sorted(by_layer)]
    return ModelState(layers, int(meta.get("seqlen_offset", 0)))
