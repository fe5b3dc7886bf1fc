"""Step-size (Δ) hooks shared by the Mamba-1 and Mamba-2 mixers: observe Δ = softplus(dt + dt_bias) on every
forward and decode step (a penalty on it trains dt and the bias), or replace it (an intervention)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

DeltaHook = Callable[[nn.Module, Tensor, Tensor], "Tensor | None"]


class DeltaHooks:
    """Mixin for a mixer module; call ``_init_delta_hooks()`` in its ``__init__``."""

    def _init_delta_hooks(self) -> None:
        # RemovableHandle id -> hook, in registration order (OrderedDict: the handle holds a weak reference)
        self._delta_hooks: OrderedDict[int, DeltaHook] = OrderedDict()

    def register_delta_hook(self, hook: DeltaHook) -> RemovableHandle:
        """Call ``hook(module, delta, u)`` with the step size of every forward and decode step; the layouts are
        the module's (``Mamba.register_delta_hook``, ``Mamba2.register_delta_hook``). The hook may return a
        tensor of delta's shape that replaces Δ (later hooks see the replacement), or None. Hooks that only
        observe leave the forward bit-identical. Returns a handle whose ``remove()`` unregisters the hook."""
        handle = RemovableHandle(self._delta_hooks)
        self._delta_hooks[handle.id] = hook
        return handle

    @property
    def has_delta_hooks(self) -> bool:
        """True while a delta hook is registered (fused decode paths that skip Δ must then step in Python)."""
        return bool(self._delta_hooks)

    def _apply_delta_hooks(self, delta: Tensor, u: Tensor) -> Tensor | None:
        """Every hook sees Δ (and u); -> the Δ that replaces the module's own, or None when no hook replaced it."""
        replaced = None
        for hook in list(self._delta_hooks.values()):
            result = hook(self, delta, u)
            if result is not None:
                if result.shape != delta.shape:
                    raise ValueError(f"{type(self).__name__} delta hook: a replacement Δ must have shape "
                                     f"{tuple(delta.shape)}, got {tuple(result.shape)}")
                delta = replaced = result
        return replaced
