"""Every dispatching op equals its ``*_ref`` twin (fp32, values and gradients) on the backend it picks here."""

import pytest
import torch

import ssm_core
from ssm_core.ops import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_update,
    causal_conv1d_update_ref,
    rms_norm,
    rms_norm_gated,
    rms_norm_ref,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, inputs, seed=0):
    """Gradients of a random linear function of ``out`` (a tensor or tuple) w.r.t. ``inputs``."""
    outs = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, [t for t in inputs if t is not None])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_causal_conv1d_equals_its_ref_twin_with_gradients(packed, activation):
    g = torch.Generator().manual_seed(0)
    batch, dim, L, W = 2, 6, 13, 4
    x, w, b = torch.randn(batch, dim, L, generator=g), torch.randn(dim, W, generator=g), torch.randn(dim, generator=g)
    h0 = None if packed else torch.randn(batch, dim, W - 1, generator=g)  # the kernel takes seq_idx without states
    seq_idx = torch.tensor([[0] * 5 + [1] * 8, [0] * 13], dtype=torch.int32) if packed else None
    results = []
    for fn in (causal_conv1d, causal_conv1d_ref):
        inputs = _leaves(x, w, b, h0)
        out = fn(*inputs[:3], seq_idx=seq_idx, initial_states=inputs[3], return_final_states=not packed,
                 activation=activation)
        results.append((out, _grads(out, inputs)))
    (out, grads), (out_ref, grads_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_update_equals_its_ref_twin_in_place_and_with_gradients():
    g = torch.Generator().manual_seed(1)
    x, state = torch.randn(3, 5, generator=g), torch.randn(3, 5, 4, generator=g)
    w, b = torch.randn(5, 4, generator=g), torch.randn(5, generator=g)
    out_ref, state_ref = causal_conv1d_update_ref(x, state, w, b, "silu")
    assert not torch.equal(state_ref, state)  # the twin is functional: its input state is untouched
    with torch.no_grad():  # the fast step (whatever backend resolves here), in place
        live = state.clone()
        out = causal_conv1d_update(x, live, w, b, "silu")
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(live, state_ref)
    inputs = _leaves(x, state, w, b)
    grads = _grads(causal_conv1d_update(*inputs[:2], inputs[2], inputs[3], "silu", inplace=False), inputs)
    inputs_ref = _leaves(x, state, w, b)
    grads_ref = _grads(causal_conv1d_update_ref(*inputs_ref, "silu"), inputs_ref)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("group_size", [None, 4])
def test_rms_norm_equals_its_ref_twin_with_gradients(group_size):
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 2, 8, generator=g) * 3, torch.randn(8, generator=g)
    torch.testing.assert_close(rms_norm(x, w, group_size=group_size), rms_norm_ref(x, w, group_size=group_size))
    assert rms_norm_ref(x.bfloat16(), w).dtype == torch.bfloat16
    x64, w64 = x.double(), w.double()
    inputs = _leaves(x64, w64)
    grads = _grads(rms_norm(*inputs, group_size=group_size), inputs)
    inputs_ref = _leaves(x64, w64)
    grads_ref = _grads(rms_norm_ref(*inputs_ref, group_size=group_size), inputs_ref)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)
    with pytest.raises(ValueError, match="group_size"):
        rms_norm_ref(x, w, group_size=3)


def test_gated_rms_norm_is_rms_norm_ref_of_the_gated_input():
    g = torch.Generator().manual_seed(3)
    x, z, w = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(8, generator=g)
    gated = x * torch.nn.functional.silu(z)
    torch.testing.assert_close(rms_norm_gated(x, z, w, group_size=4), rms_norm_ref(gated, w, group_size=4))


def test_ref_twins_are_exported_from_ssm_core():
    for name in ("causal_conv1d_ref", "causal_conv1d_update_ref", "rms_norm_ref", "selective_scan_ref",
                 "selective_state_update_ref", "ssd_ref"):
        assert callable(getattr(ssm_core, name)) and name in ssm_core.__all__
