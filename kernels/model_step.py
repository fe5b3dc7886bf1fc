"""Whole-model decode step on CPU (``csrc/model_step_cpu.h``), the kernel side: plain tensors in, no ssm_core.

``decode_model_cpu(batch)`` returns the compiled ``DecodeModel`` (part of the one extension built by
``kernels.cpu``), to which a binder (``ssm_core.models.fast_decode``) hands every layer's weights and state:

    dm = decode_model_cpu(batch)
    dm.set_io({"embedding": E, "lm_head": W, "norm_f_weight": w}, {"norm_f_eps": 1e-5, "residual_in_fp32": 1})
    dm.add_layer("mamba1" | "mamba2" | "external", tensors, numbers)      # in layer order
    dm.bind_state(i, conv_state, ssm_state)                                # updated in place by every call
    logits = dm.forward(tokens (batch, T), n_last, snapshots)              # (batch, n_last, vocab)
    dm.restore(t)                                                          # the state after token t (snapshots)

or, with external (attention) layers run by the caller in between: ``embed(tokens)``, ``run_layers(a, b,
snapshots)``, ``residual()`` (a (batch, T, d_model) fp32 view to read and write), ``head(n_last)``.

Matrices (in_proj, x_proj, dt_proj, out_proj, fc1, fc2, embedding, lm_head) are used in place: fp32 or bf16,
contiguous, one dtype for all. Per-channel parameters are contiguous fp32 (conv_weight (conv_dim, d_conv),
conv_bias, A, D, dt_bias, norm weights). The returned logits are an internal buffer, overwritten by the next
call. Not differentiable. Raises RuntimeError when the extension cannot be built (``kernels.cpu.available``).
"""

from __future__ import annotations

from . import cpu

__all__ = ["decode_model_cpu", "available"]


def available() -> bool:
    return cpu.available()


def decode_model_cpu(batch: int):
    """A new, empty compiled ``DecodeModel`` for ``batch`` rows (see the module docstring for the protocol)."""
    return cpu.load().DecodeModel(int(batch))
