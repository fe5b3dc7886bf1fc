"""Checks at the API's boundaries: what Mamba, Mamba2, MHA, Block, MixerModel and MambaLMHeadModel are given.

Each check costs a few attribute reads (token ids: one min/max reduction) and builds its message only when
it fails. The message names the module (and layer), what it expected and what it got.

Which exception: ``TypeError`` when the argument is the wrong kind of object (a list instead of a tensor,
a tensor or a dict where a state belongs); ``ValueError`` when it is the right kind with a wrong shape,
dtype, device or value (a 2-D input, the wrong d_model, int or fp64 input to an fp32 block, a token id
outside the vocabulary, a state for another batch size or model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import AttentionState, ModelState, SSMState

__all__ = [
    "module_name",
    "describe",
    "check_hidden",
    "check_token_ids",
    "check_ssm_state",
    "check_attention_state",
    "check_model_state",
]

_STATE_HELP = {
    SSMState: "returned by a call with return_state=True, or module.empty_state(batch)",
    AttentionState: "returned by a call with return_state=True, or module.empty_state(batch)",
    ModelState: "model(ids, return_state=True).state, model.empty_state(batch) or load_state(...)",
}


def module_name(module) -> str:
    """'Mamba', or 'Mamba (layer 3)' for a layer of a model."""
    idx = getattr(module, "layer_idx", None)
    name = type(module).__name__
    return name if idx is None else f"{name} (layer {idx})"


def _where(where) -> str:
    return where if isinstance(where, str) else module_name(where)


def describe(obj) -> str:
    """A short description of what was passed: 'a 2-D tensor of shape (3, 4)', 'a dict', 'an SSMState'."""
    if isinstance(obj, Tensor):
        return f"a {obj.dim()}-D {str(obj.dtype).replace('torch.', '')} tensor of shape {tuple(obj.shape)}"
    if obj is None:
        return "None"
    name = type(obj).__name__
    article = "an" if name[:1].lower() in "aeiou" or name.startswith("SSM") else "a"
    if isinstance(obj, dict):
        keys = list(obj)[:5]
        return f"a dict (keys {keys}{' ...' if len(obj) > 5 else ''})"
    return f"{article} {name}"


def check_hidden(where, x, d_model: int, weight_dtype: torch.dtype | None = None, what: str = "input") -> None:
    """x must be a floating (batch, L >= 1, d_model) tensor; with ``weight_dtype``, of that dtype (outside
    autocast). ``where``: the module (named in the message) or a name."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{_where(where)}: expected the {what} as a tensor of shape (batch, L, d_model={d_model}), "
                        f"got {describe(x)}")
    if x.dim() != 3 or x.shape[2] != d_model or x.shape[1] == 0:
        expect = f"{_where(where)}: expected the {what} of shape (batch, L, d_model={d_model}), got {describe(x)}"
        if x.dim() == 2 and x.shape[1] == d_model:
            raise ValueError(expect + "; for one sequence add the batch dimension: x.unsqueeze(0)")
        if x.dim() == 3 and x.shape[2] == d_model:
            raise ValueError(expect + ": it has no positions (L must be at least 1)")
        if x.dim() == 3:
            raise ValueError(expect + f": its last dimension must be d_model={d_model}")
        raise ValueError(expect)
    if not x.is_floating_point():
        hint = "; token ids go to MambaLMHeadModel / MixerModel" if not x.is_complex() else ""
        raise ValueError(f"{_where(where)}: expected a floating-point {what}, got {describe(x)}{hint}")
    if weight_dtype is not None and x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"{_where(where)}: the {what} is {x.dtype} but the weights are {weight_dtype}; "
            f"convert the input (x.to({weight_dtype})) or the module (.to({x.dtype}))"
        )


def check_token_ids(where, ids, vocab_size: int) -> None:
    """ids must be an integer (batch, L >= 1) tensor with every id in [0, vocab_size)."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{_where(where)}: expected token ids as an integer tensor of shape (batch, L), "
                        f"got {describe(ids)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{_where(where)}: expected integer token ids of shape (batch, L), got {describe(ids)}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        hint = ("; for one sequence add the batch dimension: ids.unsqueeze(0)" if ids.dim() == 1 and ids.numel()
                else "; there are no tokens (L must be at least 1)" if ids.dim() == 2 else "")
        raise ValueError(f"{_where(where)}: expected token ids of shape (batch, L), got {describe(ids)}{hint}")
    if ids.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(ids))
    if lo < 0 or hi >= vocab_size:
        bad = ((ids < 0) | (ids >= vocab_size)).nonzero()[0].tolist()
        raise ValueError(
            f"{_where(where)}: token ids must be in [0, {vocab_size}) (vocab_size={vocab_size}), got ids from {lo} "
            f"to {hi}; the first out of range is {int(ids[tuple(bad)])} at position {tuple(bad)}"
        )


def _check_kind(where, state, kind: type) -> None:
    if not isinstance(state, kind):
        hint = ""
        if isinstance(state, ModelState):
            hint = "; that is a whole model's state: a layer takes one layer's, state.layers[i]"
        elif isinstance(state, (SSMState, AttentionState)) and kind is ModelState:
            hint = "; that is one layer's state: a model takes a ModelState of every layer's"
        elif isinstance(state, (SSMState, AttentionState)):
            hint = "; it belongs to a different kind of layer"
        article = "an" if kind.__name__[0] in "AEIOS" else "a"  # an SSMState, an AttentionState, a ModelState
        raise TypeError(f"{_where(where)}: state= must be {article} {kind.__name__} "
                        f"({_STATE_HELP[kind]}), got {describe(state)}{hint}")


def _check_tensor(where, state_name: str, t, expected: tuple, device: torch.device, detail) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{_where(where)}: {state_name} must be a tensor, got {describe(t)}")
    if t.shape != expected:
        if t.dim() == len(expected) and t.shape[0] != expected[0]:
            raise ValueError(f"{_where(where)}: the state is for batch size {t.shape[0]}, "
                             f"the input has batch size {expected[0]}")
        detail = detail() if callable(detail) else detail
        raise ValueError(f"{_where(where)}: {state_name} has shape {tuple(t.shape)}, this layer expects {expected} "
                         f"({detail}): the state comes from a different model or layer")
    if t.device != device:
        raise ValueError(f"{_where(where)}: {state_name} is on {t.device}, the input on {device}")


def check_ssm_state(where, state, batch: int, conv_shape: tuple, ssm_shape: tuple, device, detail="") -> None:
    """state must be an SSMState with conv (batch, *conv_shape) and ssm (batch, *ssm_shape) on ``device``.
    ``detail``: the sizes behind the expected shapes, for the message (a string, or a function making it)."""
    _check_kind(where, state, SSMState)
    _check_tensor(where, "state.ssm", state.ssm, (batch, *ssm_shape), device, detail)
    _check_tensor(where, "state.conv", state.conv, (batch, *conv_shape), device, detail)


def check_attention_state(where, state, batch: int, nheads_kv: int, head_dim: int, device) -> None:
    """state must be an AttentionState with k, v (batch, nheads_kv, T, head_dim), the same T."""
    _check_kind(where, state, AttentionState)
    for name in ("k", "v"):
        t = getattr(state, name)
        if not isinstance(t, Tensor):
            raise TypeError(f"{_where(where)}: state.{name} must be a tensor, got {describe(t)}")
        if t.dim() == 4 and t.shape[0] != batch and t.shape[1:2] + t.shape[3:] == (nheads_kv, head_dim):
            raise ValueError(f"{_where(where)}: the state is for batch size {t.shape[0]}, "
                             f"the input has batch size {batch}")
        if t.dim() != 4 or (t.shape[0], t.shape[1], t.shape[3]) != (batch, nheads_kv, head_dim):
            raise ValueError(f"{_where(where)}: state.{name} has shape {tuple(t.shape)}, this layer expects "
                             f"(batch={batch}, nheads_kv={nheads_kv}, T, head_dim={head_dim}): the state comes "
                             "from a different model or layer")
        if t.device != device:
            raise ValueError(f"{_where(where)}: state.{name} is on {t.device}, the input on {device}")
    if state.k.shape != state.v.shape:
        raise ValueError(f"{_where(where)}: state.k {tuple(state.k.shape)} and state.v {tuple(state.v.shape)} differ")


def check_model_state(where, state, n_layer: int) -> None:
    """state must be a ModelState with one layer state per layer (each layer checks its own)."""
    _check_kind(where, state, ModelState)
    if not isinstance(state.layers, (list, tuple)) or len(state.layers) != n_layer:
        got = len(state.layers) if isinstance(state.layers, (list, tuple)) else describe(state.layers)
        raise ValueError(f"{_where(where)}: the state has {got} layer states, this model has {n_layer} layers: "
                         "it was made for a different model")


def _weight_dtype(module) -> torch.dtype:
    """module.in_proj.weight.dtype without nn.Module.__getattr__ (a few microseconds a call, per layer and token)."""
    return module._modules["in_proj"]._parameters["weight"].dtype


def check_mamba(module, x, state) -> None:
    """Mamba.forward's arguments: x (batch, L, d_model) in the weights' dtype, state None or this layer's SSMState."""
    check_hidden(module, x, module.d_model, _weight_dtype(module))
    if state is not None:
        check_ssm_state(module, state, x.shape[0], (module.d_inner, module.d_conv - 1),
                        (module.d_inner, module.d_state), x.device,
                        lambda: f"d_inner={module.d_inner}, d_conv={module.d_conv}, d_state={module.d_state}")


def check_mamba2(module, x, state, seq_idx=None) -> None:
    """Mamba2.forward's arguments (and seq_idx: None or an integer (batch, L) tensor)."""
    check_hidden(module, x, module.d_model, _weight_dtype(module))
    if state is not None:
        check_ssm_state(module, state, x.shape[0], (module.conv_dim, module.d_conv - 1),
                        (module.nheads, module.headdim, module.d_state), x.device,
                        lambda: f"conv_dim={module.conv_dim}, d_conv={module.d_conv}, nheads={module.nheads}, "
                                f"headdim={module.headdim}, d_state={module.d_state}")
    if seq_idx is not None and (not isinstance(seq_idx, Tensor) or seq_idx.is_floating_point()
                                or tuple(seq_idx.shape) != tuple(x.shape[:2])):
        raise ValueError(f"{module_name(module)}: seq_idx must be an integer tensor of shape (batch, L) = "
                         f"{tuple(x.shape[:2])}, got {describe(seq_idx)}")
