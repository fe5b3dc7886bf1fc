"""Mamba.register_delta_hook / Mamba2.register_delta_hook: hooks see the step size Δ the block really uses, may
replace it, and leave the forward bit-identical once removed; decode steps call them too."""

import pytest
import torch
import torch.nn.functional as F

from ssm_core import Mamba, Mamba2
from ssm_core.ops import causal_conv1d_ref, selective_scan_ref, ssd_ref

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def block():
    torch.manual_seed(0)
    return Mamba(d_model=8, d_state=4, d_conv=3)


def manual_forward(m: Mamba, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The block written out with a given Δ (batch, d_inner, L): what the output must be if Δ is the one used."""
    x, z = m.in_proj(hidden).chunk(2, dim=-1)
    u = causal_conv1d_ref(x.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu")
    _, B, C = m.x_proj(u.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    y = selective_scan_ref(u, delta, -torch.exp(m.A_log), B.transpose(1, 2), C.transpose(1, 2), m.D,
                           z.transpose(1, 2))
    return m.out_proj(y.transpose(1, 2))


def record(seen: list):
    def hook(module, delta, u):
        seen.append((module, delta.detach().clone(), u.detach().clone()))
    return hook


def test_hook_sees_the_delta_that_reproduces_the_output_and_observing_changes_nothing(block):
    hidden = torch.randn(2, 11, 8)
    seen = []
    with torch.no_grad():
        plain = block(hidden)
        block.register_delta_hook(record(seen))
        out = block(hidden)
    [(module, delta, u)] = seen
    assert module is block and delta.dtype == torch.float32
    assert delta.shape == u.shape == (2, block.d_inner, 11) and (delta > 0).all()
    assert torch.equal(out, plain)  # a hook that returns None leaves the forward bit-identical
    with torch.no_grad():
        torch.testing.assert_close(out, manual_forward(block, hidden, delta), rtol=1e-4, atol=1e-5)


def test_replacing_hook_changes_the_output_as_expected_and_removal_restores_it_bit_for_bit(block):
    hidden = torch.randn(2, 9, 8)
    seen = []
    with torch.no_grad():
        before = block(hidden)
        scale = block.register_delta_hook(lambda m, delta, u: 100 * delta)  # Δ init is 1e-3..0.1
        recorder = block.register_delta_hook(record(seen))  # runs second: sees the replacement
        scaled = block(hidden)
        torch.testing.assert_close(scaled, manual_forward(block, hidden, seen[0][1]), rtol=1e-4, atol=1e-5)
        scale.remove()
        block(hidden)
        torch.testing.assert_close(seen[0][1], 100 * seen[1][1])  # the replacement: 100 x the block's own Δ
        assert (scaled - before).abs().max() > 0.1 * before.abs().max()
        recorder.remove()
        assert torch.equal(block(hidden), before)


def test_zero_delta_keeps_the_state_and_handles_remove_cleanly(block):
    hidden = torch.randn(1, 7, 8)
    with torch.no_grad():
        plain = block(hidden)
        h = block.register_delta_hook(lambda m, delta, u: torch.zeros_like(delta))
        _, state = block(hidden, return_state=True)
        assert torch.equal(state.ssm, torch.zeros_like(state.ssm))  # Δ = 0: no write, no decay
        h.remove()
        assert torch.equal(block(hidden), plain)


def test_decode_steps_call_the_hook_and_match_the_hooked_forward(block):
    hidden = torch.randn(2, 6, 8)
    seen = []
    block.register_delta_hook(lambda m, delta, u: delta * 0.5)
    block.register_delta_hook(record(seen))
    with torch.no_grad():
        full = block(hidden)
        n_forward = len(seen)
        state, steps = None, []
        for t in range(hidden.shape[1]):
            y, state = block(hidden[:, t:t + 1], state=state, return_state=True)
            steps.append(y)
    assert n_forward == 1 and len(seen) == 1 + hidden.shape[1]
    assert all(d.shape == u.shape == (2, block.d_inner) for _, d, u in seen[1:])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_a_penalty_on_the_hooked_delta_trains_the_dt_bias(block):
    deltas = []
    block.register_delta_hook(lambda m, delta, u: deltas.append(delta))
    block(torch.randn(2, 5, 8))
    deltas[0].mean().backward()
    assert (block.dt_proj.bias.grad > 0).all()  # Δ grows with the bias: an L1 penalty pushes it down


def test_lti_blocks_expose_their_constant_delta():
    torch.manual_seed(0)
    lti = Mamba(d_model=8, d_state=4, selective=False)
    seen = []
    lti.register_delta_hook(record(seen))
    with torch.no_grad():
        lti(torch.randn(1, 5, 8))
    delta = seen[0][1]
    torch.testing.assert_close(delta, F.softplus(lti.dt_bias)[None, :, None].expand_as(delta))


def test_a_replacement_of_the_wrong_shape_is_an_error(block):
    block.register_delta_hook(lambda m, delta, u: delta[:, :, :1])
    with pytest.raises(ValueError, match="replacement"):
        block(torch.randn(1, 4, 8))


@pytest.fixture
def block2():
    torch.manual_seed(0)
    return Mamba2(d_model=16, d_state=8, headdim=4, chunk_size=4).double()


def manual_forward2(m: Mamba2, hidden: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Mamba-2 written out with a given Δ (batch, L, nheads), through the token-by-token SSD twin."""
    z0, x0, z, xBC, _ = m.in_proj(hidden).split([m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, m.nheads], dim=-1)
    xBC = causal_conv1d_ref(xBC.transpose(1, 2), m.conv1d.weight.squeeze(1), m.conv1d.bias, activation="silu")
    x, B, C = xBC.transpose(1, 2).split([m.d_ssm, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
    y = ssd_ref(x.unflatten(-1, (m.nheads, m.headdim)), delta, -torch.exp(m.A_log),
                B.unflatten(-1, (m.ngroups, m.d_state)), C.unflatten(-1, (m.ngroups, m.d_state)), D=m.D)
    return m.out_proj(m.norm(y.flatten(-2), z))


def test_mamba2_hook_sees_the_per_head_delta_that_reproduces_the_output(block2):
    hidden = torch.randn(2, 9, 16, dtype=torch.float64)
    seen = []
    with torch.no_grad():
        plain = block2(hidden)
        h = block2.register_delta_hook(record(seen))
        assert torch.equal(block2(hidden), plain)  # observing only: bit-identical
        [(module, delta, u)] = seen
        assert module is block2 and delta.shape == (2, 9, block2.nheads) and u.shape == (2, 9, block2.nheads, 4)
        torch.testing.assert_close(plain, manual_forward2(block2, hidden, delta))
        h.remove()
        halve = block2.register_delta_hook(lambda m, d, u: 0.5 * d)
        torch.testing.assert_close(block2(hidden), manual_forward2(block2, hidden, 0.5 * delta))
        halve.remove()
        assert torch.equal(block2(hidden), plain) and not block2.has_delta_hooks


def test_mamba2_decode_steps_call_the_hook_and_zero_delta_keeps_the_state(block2):
    hidden = torch.randn(2, 6, 16, dtype=torch.float64)
    block2.register_delta_hook(lambda m, d, u: d * 0.5)
    with torch.no_grad():
        full = block2(hidden)
        state, steps = None, []
        for t in range(hidden.shape[1]):
            y, state = block2(hidden[:, t:t + 1], state=state, return_state=True)
            steps.append(y)
        torch.testing.assert_close(torch.cat(steps, dim=1), full)
        zero = block2.register_delta_hook(lambda m, d, u: torch.zeros_like(d))
        _, state = block2(hidden, return_state=True)
        assert torch.equal(state.ssm, torch.zeros_like(state.ssm))
        zero.remove()
    deltas = []
    block2.register_delta_hook(lambda m, d, u: deltas.append(d))
    block2(hidden)
    deltas[-1].mean().backward()
    assert (block2.dt_bias.grad > 0).all()  # a penalty on Δ trains the bias
