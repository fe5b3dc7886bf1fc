"""Mamba(selective=False): the LTI ablation ("S4" inside the Mamba block, Table 1 of the Mamba paper)."""

import pytest
import torch
import torch.nn.functional as F

from ssm_core import Mamba, MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def _lti(d_model=16, d_state=8, seed=0) -> Mamba:
    torch.manual_seed(seed)
    m = Mamba(d_model, d_state=d_state, selective=False).double()
    with torch.no_grad():  # move B, C, Δ off their init so a wrong formula cannot hide behind B = 1
        m.B.normal_()
        m.C.normal_()
        m.dt_bias.uniform_(-3, 0)
        m.D.uniform_(-1, 1)
    return m


def _fixed_kernel_reference(m: Mamba, u: torch.Tensor) -> torch.Tensor:
    """The LTI layer written as a convolution whose kernel depends on the parameters only:
    K[d, t] = sum_n C_n B_n Δ_d exp(Δ_d A_dn t), Δ = softplus(dt_bias); y = K * x + D x, gated by silu(z)."""
    L = u.shape[1]
    x, z = m.in_proj(u).chunk(2, dim=-1)
    x = F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1, groups=m.d_inner)
    x = F.silu(x[..., :L])  # (batch, d_inner, L)
    dt = F.softplus(m.dt_bias)  # (d_inner,)
    A = -torch.exp(m.A_log.double())  # (d_inner, N)
    t = torch.arange(L, dtype=torch.float64)
    K = (m.C * m.B * dt[:, None, None] * torch.exp(dt[:, None, None] * A[:, None, :] * t[None, :, None])).sum(-1)
    # causal convolution: y[d, t] = sum_{s <= t} K[d, t - s] x[d, s]
    y = F.conv1d(F.pad(x, (L - 1, 0)), K.flip(-1).unsqueeze(1), groups=m.d_inner)
    y = (y + m.D[:, None] * x) * F.silu(z.transpose(1, 2))
    return m.out_proj(y.transpose(1, 2))


def test_lti_is_a_fixed_convolution():
    m = _lti()
    assert not hasattr(m, "x_proj") and not hasattr(m, "dt_proj")
    for seed in (1, 2):  # two unrelated inputs, one kernel
        u = torch.randn(2, 37, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(m(u), _fixed_kernel_reference(m, u), rtol=1e-9, atol=1e-9)


def test_selective_layer_is_not_a_fixed_convolution():
    """The same check fails for the selective layer (Δ, B, C from x_proj): the test can tell them apart."""
    lti = _lti()
    torch.manual_seed(0)
    sel = Mamba(16, d_state=8).double()
    lti_sd = {k: v for k, v in sel.state_dict().items() if k in lti.state_dict()}
    lti.load_state_dict(lti_sd, strict=False)
    u = torch.randn(2, 37, 16, dtype=torch.float64)
    assert not torch.allclose(sel(u), _fixed_kernel_reference(lti, u), atol=1e-3)


def test_lti_state_and_step_match_forward():
    m = _lti()
    u = torch.randn(2, 24, 16, dtype=torch.float64)
    y = m(u)
    y1, s = m(u[:, :10], return_state=True)
    y2, s = m(u[:, 10:], state=s, return_state=True)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-9, atol=1e-9)
    s, steps = None, []
    for t in range(u.shape[1]):  # L == 1: the decode-step path
        yt, s = m(u[:, t : t + 1], state=s, return_state=True)
        steps.append(yt)
    torch.testing.assert_close(torch.cat(steps, 1), y, rtol=1e-9, atol=1e-9)


def test_lti_gradients_reach_delta_B_C():
    m = _lti()
    m(torch.randn(2, 12, 16, dtype=torch.float64)).square().sum().backward()
    for p in (m.dt_bias, m.B, m.C, m.A_log):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_lti_config_and_checkpoint_round_trip(tmp_path):
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=16, ssm_cfg={"selective": False})
    assert MambaConfig.from_json(cfg.to_json()) == cfg
    torch.manual_seed(0)
    model = MambaLMHeadModel(cfg).eval()
    assert all(not layer.mixer.selective for layer in model.backbone.layers)
    model.save_pretrained(tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config == cfg and not loaded.backbone.layers[0].mixer.selective
    ids = torch.randint(0, 16, (2, 20))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_selective_default_unchanged():
    m = Mamba(16)
    assert m.selective and hasattr(m, "x_proj") and not hasattr(m, "B")
    with pytest.raises(ValueError, match="selectiv"):
        MambaConfig(d_model=16, n_layer=1, vocab_size=8, ssm_cfg={"selectiv": False})
