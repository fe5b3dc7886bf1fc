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

from .io import CorruptFileError, atomic_write, read_safetensors, read_safetensors_metadata

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
    """Write a state cartridge (safetensors + the model config in its metadata), atomically: a save that
    fails or is killed midway leaves the old file intact."""
    from safetensors.torch import save_file

    if not isinstance(state, ModelState):
        raise TypeError(f"save_state: expected a ModelState (model(ids, return_state=True).state), "
                        f"got {type(state).__name__}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.tensors().items()}
    meta = {"format": _FORMAT, "config": config.to_json(), "seqlen_offset": str(state.seqlen_offset)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_state(path: str | os.PathLike, config, device=None) -> ModelState:
    """Read a state cartridge written for a model with this ``config``; a mismatch is a ValueError.

    A missing file is a FileNotFoundError; a corrupt or truncated one (or not a cartridge) a ValueError
    (``ssm_core.io.CorruptFileError`` for unreadable safetensors) naming the file and what is wrong."""
    path = os.fspath(path)
    kind = "state cartridge"
    meta = read_safetensors_metadata(path, kind=kind)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: not a hiss state cartridge (format={meta.get('format')!r}; "
                         "cartridges are written by save_state)")
    try:
        saved = json.loads(meta["config"])
        offset = int(meta.get("seqlen_offset", 0))
        if not isinstance(saved, dict):
            raise ValueError(f"config is a JSON {type(saved).__name__}")
    except (KeyError, ValueError) as e:
        what = "no model config" if isinstance(e, KeyError) else f"unreadable config / seqlen_offset ({e})"
        raise CorruptFileError(f"{path}: corrupt state cartridge: its metadata has {what}") from e
    mine = json.loads(config.to_json())
    diff = sorted(k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k))
    if diff:
        detail = ", ".join(f"{k}: cartridge {saved.get(k)!r} vs model {mine.get(k)!r}" for k in diff)
        raise ValueError(f"{path}: state cartridge was saved for a different model ({detail})")
    tensors = read_safetensors(path, kind=kind)
    by_layer: dict[int, dict[str, Tensor]] = {}
    kinds: dict[int, str] = {}
    cls = {"SSMState": SSMState, "AttentionState": AttentionState}
    for key, t in tensors.items():
        parts = key.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[2] not in cls:
            raise CorruptFileError(f"{path}: corrupt state cartridge: unexpected tensor {key!r} "
                                   "(expected layers.<i>.SSMState|AttentionState.<field>)")
        _, i, layer_kind, name = parts
        by_layer.setdefault(int(i), {})[name] = t.to(device) if device is not None else t
        kinds[int(i)] = layer_kind
    n_layer = getattr(config, "n_layer", len(by_layer))
    if sorted(by_layer) != list(range(n_layer)):
        raise CorruptFileError(f"{path}: corrupt state cartridge: it holds layers {sorted(by_layer)}, "
                               f"the model has layers 0..{n_layer - 1}")
    layers = []
    for i in range(n_layer):
        want = {f.name for f in fields(cls[kinds[i]])}
        if set(by_layer[i]) != want:
            raise CorruptFileError(f"{path}: corrupt state cartridge: layer {i} ({kinds[i]}) has tensors "
                                   f"{sorted(by_layer[i])}, expected {sorted(want)}")
        layers.append(cls[kinds[i]](**by_layer[i]))
    return ModelState(layers, offset)
