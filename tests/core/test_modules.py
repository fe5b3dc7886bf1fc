"""Module constructors and init against mamba_ssm's, MambaConfig validation and JSON, Bidirectional."""

import math

import pytest
import torch
import torch.nn.functional as F

import ssm_core
from ssm_core import Bidirectional, Mamba, Mamba2, MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def softplus_in(bias: torch.Tensor, lo: float, hi: float) -> bool:
    dt = F.softplus(bias.double())
    return bool(((dt >= lo * (1 - 1e-6)) & (dt <= hi * (1 + 1e-6))).all())


# --------------------------------------------------------------------------------------------
# Mamba (Mamba-1)
# --------------------------------------------------------------------------------------------


def test_mamba_parameters_match_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(16)  # mamba_ssm defaults: d_state 16, d_conv 4, expand 2, dt_rank ceil(16/16) = 1
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (64, 16),
        "conv1d.weight": (32, 1, 4),
        "conv1d.bias": (32,),
        "x_proj.weight": (1 + 2 * 16, 32),
        "dt_proj.weight": (32, 1),
        "dt_proj.bias": (32,),
        "A_log": (32, 16),
        "D": (32,),
        "out_proj.weight": (16, 32),
    }
    assert (m.d_inner, m.dt_rank, m.d_state, m.d_conv) == (32, 1, 16, 4)
    assert m.A_log.dtype == torch.float32
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17, dtype=torch.float32)).expand(32, 16))
    assert torch.equal(m.D, torch.ones(32))
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    assert not getattr(m.in_proj.weight, "_no_weight_decay", False)
    assert m.dt_proj.bias._no_reinit
    assert softplus_in(m.dt_proj.bias, 0.001, 0.1)
    assert m.dt_proj.weight.abs().max() <= 1.0  # uniform(-dt_rank**-0.5, dt_rank**-0.5)
    assert m.conv1d.padding == (3,) and m.conv1d.groups == 32


def test_mamba_init_options():
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, expand=1, dt_rank=4, dt_min=0.01, dt_max=0.05, dt_init="constant", dt_scale=2.0,
              bias=True, conv_bias=False)
    assert m.dt_rank == 4 and m.d_inner == 32
    assert torch.allclose(m.dt_proj.weight, torch.full((32, 4), 4**-0.5 * 2.0))
    assert softplus_in(m.dt_proj.bias, 0.01, 0.05)
    assert m.conv1d.bias is None and m.in_proj.bias is not None and m.out_proj.bias is not None
    assert m.x_proj.weight.shape == (4 + 16, 32)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="bogus")


def test_mamba_keeps_ssm_params_fp32_in_low_precision():
    m = Mamba(16, d_state=4, dtype=torch.bfloat16)
    assert m.in_proj.weight.dtype == torch.bfloat16
    assert m.A_log.dtype == m.D.dtype == torch.float32
    y = m(torch.randn(1, 5, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_lm_init_matches_mamba_ssm():
    """_init_weights: Linear biases zeroed except dt_proj's; out_proj rescaled by 1/sqrt(n_layer)."""
    torch.manual_seed(0)
    n_layer = 4
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=n_layer, vocab_size=64,
                                         ssm_cfg={"d_state": 4, "bias": True}))
    bound = 1 / math.sqrt(64) / math.sqrt(n_layer)  # kaiming_uniform(a=sqrt(5)) bound over fan_in = d_inner
    for layer in model.backbone.layers:
        mixer = layer.mixer
        assert softplus_in(mixer.dt_proj.bias, 0.001, 0.1)  # survives the model-level bias zeroing
        assert torch.equal(mixer.in_proj.bias, torch.zeros(128))
        w = mixer.out_proj.weight.abs().max().item()
        assert 0.8 * bound < w <= bound
    emb = model.backbone.embedding.weight
    assert abs(emb.std().item() - 0.02) < 0.004
    assert model.lm_head.weight is emb


# --------------------------------------------------------------------------------------------
# Mamba2
# --------------------------------------------------------------------------------------------


def test_mamba2_parameters_match_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=8, ngroups=2)
    d_inner, nheads = 32, 4
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {
        "in_proj.weight": (2 * d_inner + 2 * 2 * 8 + nheads, 16),
        "conv1d.weight": (d_inner + 2 * 2 * 8, 1, 4),
        "conv1d.bias": (d_inner + 2 * 2 * 8,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (16, d_inner),
    }
    assert (m.nheads, m.d_ssm, m.d_mlp, m.conv_dim) == (4, 32, 0, 64)
    assert m.A_log.dtype == torch.float32
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    assert softplus_in(m.dt_bias, 0.001, 0.1)
    assert torch.equal(m.D, torch.ones(nheads)) and torch.equal(m.norm.weight, torch.ones(d_inner))
    assert m.dt_bias._no_weight_decay and m.A_log._no_weight_decay and m.D._no_weight_decay
    assert m.norm.group_size == d_inner // 2


def test_mamba2_options():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=4, A_init_range=(2, 3), D_has_hdim=True, rmsnorm=False, conv_init=0.01,
               dt_min=0.02, dt_max=0.03)
    assert m.D.shape == (32,) and not hasattr(m, "norm")
    A = torch.exp(m.A_log)
    assert ((A >= 2) & (A <= 3)).all() and m.A_log.shape == (8,)
    assert m.conv1d.weight.abs().max() <= 0.01
    assert softplus_in(m.dt_bias, 0.02, 0.03)
    y = m(torch.randn(2, 11, 16))
    assert y.shape == (2, 11, 16) and torch.isfinite(y).all()


def test_mamba2_mlp_branch():
    """d_ssm < d_inner: the remaining channels are a gated MLP branch (mamba_ssm's layout)."""
    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=8, d_ssm=16, chunk_size=8)
    assert (m.d_inner, m.d_ssm, m.d_mlp, m.nheads) == (32, 16, 16, 2)
    assert m.in_proj.weight.shape == (2 * 32 + 2 * 8 + 2, 16)
    assert m.conv1d.weight.shape == (16 + 2 * 8, 1, 4)
    assert m.norm.weight.shape == (16,) and m.out_proj.weight.shape == (16, 32)
    x = torch.randn(2, 13, 16)
    y = m(x)
    assert y.shape == (2, 13, 16) and torch.isfinite(y).all()
    with torch.no_grad():  # the MLP rows (z0, x0 come first) really feed the output
        m.in_proj.weight[: 2 * m.d_mlp] = 0
    y0 = m(x)
    assert (y - y0).abs().max() > 1e-3
    # and the output is exactly SSM-part only: out_proj columns of the MLP branch see silu(0) * 0 = 0
    with torch.no_grad():
        m.out_proj.weight[:, : m.d_mlp] = 123.0
    assert torch.allclose(m(x), y0)


def test_mamba2_shape_errors():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(16, headdim=12)  # d_ssm = 32 not divisible by 12
    with pytest.raises(ValueError, match="headdim"):
        Mamba2(16, headdim=8, d_ssm=12)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba2(16, headdim=8, ngroups=3)  # nheads 4 not divisible by 3
    with pytest.raises(ValueError, match="d_ssm"):
        Mamba2(16, headdim=8, d_ssm=64)  # more than d_inner
    with pytest.raises(ValueError, match="A_init_range"):
        Mamba2(16, headdim=8, A_init_range=(0, 4))


def test_mamba2_norm_eps_is_used():
    torch.manual_seed(0)
    a = Mamba2(16, d_state=8, headdim=8, chunk_size=8)
    b = Mamba2(16, d_state=8, headdim=8, chunk_size=8, norm_eps=10.0)
    b.load_state_dict(a.state_dict())
    assert a.norm.eps == 1e-5 and b.norm.eps == 10.0
    x = torch.randn(1, 9, 16)
    assert (a(x) - b(x)).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [
    lambda: Mamba(16, d_state=8),
    lambda: Mamba(16, d_state=4, complex_A=True),
    lambda: Mamba2(16, d_state=16, headdim=8, chunk_size=8),
], ids=["mamba", "mamba-complex", "mamba2"])
def test_long_prefill_in_pieces_equals_one_shot(layer, monkeypatch):
    """A long no-grad CPU forward runs in PREFILL_PIECE-token pieces with the state carried: the same output and
    final state as one call with autograd on (which never splits); a delta hook sees the whole call at once."""
    torch.manual_seed(0)
    m = layer().double()
    monkeypatch.setattr(type(m), "PREFILL_PIECE", 16)
    u = torch.randn(2, 53, 16, dtype=torch.float64, requires_grad=True)
    one, st_one = m(u, return_state=True)
    calls = []
    orig = m._forward
    monkeypatch.setattr(m, "_forward", lambda *a: calls.append(a[0].shape[1]) or orig(*a))
    with torch.no_grad():
        pieces, st = m(u, return_state=True)
    assert calls == [16, 16, 16, 5]
    torch.testing.assert_close(pieces, one.detach(), atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(st.ssm, st_one.ssm, atol=1e-11, rtol=1e-10)
    torch.testing.assert_close(st.conv, st_one.conv, atol=0, rtol=0)
    seen = []
    length = (lambda d: d.shape[-1]) if isinstance(m, Mamba) else (lambda d: d.shape[1])  # (b, d, L) / (b, L, h)
    handle = m.register_delta_hook(lambda mod, delta, x: seen.append(length(delta)))
    calls.clear()
    with torch.no_grad():
        m(u)
    handle.remove()
    assert calls == [53] and seen == [53]


# --------------------------------------------------------------------------------------------
# MambaConfig
# --------------------------------------------------------------------------------------------

CONFIGS = [
    MambaConfig(d_model=16, n_layer=2, vocab_size=64),
    MambaConfig(d_model=16, n_layer=3, vocab_size=100, d_intermediate=32, attn_layer_idx=[1],
                attn_cfg={"num_heads": 2, "rotary_emb_dim": 4}, ssm_cfg={"d_state": 4, "dt_rank": 3},
                tie_embeddings=False, rms_norm=False, norm_epsilon=1e-6),
    MambaConfig(d_model=16, n_layer=2, vocab_size=64,
                ssm_cfg={"layer": "Mamba2", "headdim": 8, "ngroups": 2, "A_init_range": (1, 16),
                         "dt_limit": (0.0, float("inf"))}),
    MambaConfig(d_model=16, n_layer=2, vocab_size=64, bidirectional=True, bidirectional_strategy="concat",
                bidirectional_weight_tie=False),
]



@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "hybrid", "mamba2-tuples", "bidirectional"])
def test_config_json_round_trip(cfg, tmp_path):
    again = MambaConfig.from_json(cfg.to_json())
    assert again == cfg
    assert again.to_json() == cfg.to_json()
    cfg.save(tmp_path / "c.json")
    assert MambaConfig.load(tmp_path / "c.json") == cfg
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg


def test_config_padded_vocab():
    assert MambaConfig(d_model=8, n_layer=1, vocab_size=50277).padded_vocab_size == 50280
    cfg16 = MambaConfig(d_model=8, n_layer=1, vocab_size=50277, pad_vocab_size_multiple=16)
    assert cfg16.padded_vocab_size == 50288
    assert MambaConfig(d_model=8, n_layer=1, vocab_size=256).padded_vocab_size == 256


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=0), "d_model"),
        (dict(n_layer=True), "n_layer"),
        (dict(d_intermediate=-1), "d_intermediate"),
        (dict(ssm_cfg={"layer": "Mamba3"}), "Mamba3"),
        (dict(ssm_cfg={"d_state": 4, "headdim": 8}), "headdim"),  # a Mamba2 key on Mamba1
        (dict(ssm_cfg={"layer": "Mamba2", "dt_rank": 4}), "dt_rank"),  # a Mamba1 key on Mamba2
        (dict(ssm_cfg={"layer": "Mamba2", "headdim": 12}), "headdim"),
        (dict(attn_layer_idx=[2], attn_cfg={"num_heads": 2}), "attn_layer_idx"),
        (dict(attn_layer_idx=[-1], attn_cfg={"num_heads": 2}), "attn_layer_idx"),
        (dict(attn_layer_idx=[1]), "num_heads"),
        (dict(attn_layer_idx=[1], attn_cfg={"num_heads": 2, "heads": 2}), "heads"),
        (dict(bidirectional_strategy="max"), "bidirectional_strategy"),
    ],
)
def test_config_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**{"d_model": 16, "n_layer": 2, "vocab_size": 64, **kwargs})


def test_config_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match="d_modle"):
        MambaConfig.from_dict({"d_modle": 16, "n_layer": 2})
    with pytest.raises(ValueError, match="n_layers"):
        MambaConfig.from_json('{"d_model": 16, "n_layers": 2}')
    (tmp_path / "bad.json").write_text('{"d_model": 16,,}')
    with pytest.raises(ValueError, match="line 1, column 16"):
        MambaConfig.load(tmp_path / "bad.json")


# --------------------------------------------------------------------------------------------
# Bidirectional
# --------------------------------------------------------------------------------------------

MIXERS = {
    "Mamba": lambda: Mamba(16, d_state=4),
    "Mamba2": lambda: Mamba2(16, d_state=8, headdim=8, chunk_size=8),
}


def _x(batch=2, length=14, seed=0, dtype=torch.float64):
    return torch.randn(batch, length, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("kind", list(MIXERS))
def test_bidirectional_merges_and_tie(kind):
    torch.manual_seed(0)
    fwd = MIXERS[kind]().double()
    x = _x()
    expected_add = fwd(x) + fwd(x.flip(1)).flip(1)
    add = Bidirectional(fwd, None, merge="add")
    assert add.weight_tie
    assert {id(p) for p in add.parameters()} == {id(p) for p in fwd.parameters()}  # shared, not copied
    y_add = add(x)
    assert y_add.shape == x.shape
    assert torch.allclose(y_add, expected_add, atol=1e-12)
    mean = Bidirectional(fwd, None, merge="mean")
    assert torch.allclose(mean(x), expected_add / 2, atol=1e-12)

    rev = MIXERS[kind]().double()
    untied = Bidirectional(fwd, rev, merge="concat", d_model=16).double()
    assert not untied.weight_tie
    n_fwd = sum(p.numel() for p in fwd.parameters())
    assert sum(p.numel() for p in untied.parameters()) == 2 * n_fwd + 2 * 16 * 16
    assert untied.merge_proj.weight.shape == (16, 32)
    y_cat = untied(x)
    assert y_cat.shape == x.shape
    expected_cat = untied.merge_proj(torch.cat([fwd(x), rev(x.flip(1)).flip(1)], dim=-1))
    assert torch.allclose(y_cat, expected_cat, atol=1e-12)


def test_bidirectional_errors():
    m = Mamba(16, d_state=4)
    with pytest.raises(ValueError, match="merge"):
        Bidirectional(m, merge="max")
    with pytest.raises(ValueError, match="d_model"):
        Bidirectional(torch.nn.Identity(), merge="concat")
    bi = Bidirectional(m)
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError):
        bi(x, return_state=True)
    with pytest.raises(ValueError):
        bi(x, state=m.empty_state(1))


@pytest.mark.parametrize("kind", list(MIXERS))
def test_bidirectional_sees_the_future_causal_does_not(kind):
    torch.manual_seed(0)
    mixer = MIXERS[kind]().double()
    bi = Bidirectional(mixer)
    x = _x()
    x2 = x.clone()
    x2[:, 10] += 1.0  # perturb a later token
    causal_a, causal_b = mixer(x), mixer(x2)
    assert torch.equal(causal_a[:, :10], causal_b[:, :10])
    assert (causal_a[:, 10:] - causal_b[:, 10:]).abs().max() > 1e-3
    bi_a, bi_b = bi(x), bi(x2)
    assert ((bi_a[:, :10] - bi_b[:, :10]).abs().amax(-1) > 1e-8).all()  # every earlier position changes


@pytest.mark.parametrize("kind", list(MIXERS))
def test_bidirectional_lengths_right_padding(kind):
    torch.manual_seed(0)
    bi = Bidirectional(MIXERS[kind]().double(), merge="add")
    x = _x(length=14)
    lengths = torch.tensor([14, 9])
    padded = x.clone()
    padded[1, 9:] = 100.0 * torch.randn(5, 16, dtype=torch.float64)  # garbage in the padding
    y = bi(padded, lengths=lengths)
    alone = bi(x[1:, :9])
    assert (y[1, :9] - alone[0]).abs().max() <= 1e-10
    assert (y[0] - bi(x[:1])[0]).abs().max() <= 1e-10
    # without lengths the padding leaks into the valid positions through the reverse direction
    assert (bi(padded)[1, :9] - alone[0]).abs().max() > 1e-3


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_bidirectional_model(layer):
    ssm = {"d_state": 4}
    if layer == "Mamba2":
        ssm = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=20, pad_vocab_size_multiple=4, ssm_cfg=ssm,
                      bidirectional=True, bidirectional_strategy="concat", bidirectional_weight_tie=False)
    model = MambaLMHeadModel(cfg).eval()
    assert all(isinstance(layer.mixer, Bidirectional) for layer in model.backbone.layers)
    ids = torch.randint(0, 20, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        assert logits.shape == (2, 12, 20)
        ids2 = ids.clone()
        ids2[:, 8] = (ids2[:, 8] + 1) % 20
        assert (model(ids2).logits[:, :8] - logits[:, :8]).abs().max() > 1e-6  # not causal
        # lengths reach the mixers: a right-padded row equals the unpadded row
        padded = ids.clone()
        padded[1, 7:] = 0
        out = model(padded, lengths=torch.tensor([12, 7])).logits
        assert (out[1, :7] - model(ids[1:, :7]).logits[0]).abs().max() <= 1e-5
        assert torch.allclose(out[0], logits[0], atol=1e-6)
    with pytest.raises(ValueError):
        model.empty_state(1)
    with pytest.raises(ValueError):
        model(ids, return_state=True)
    with pytest.raises(ValueError):
        model.generate(ids, max_new_tokens=2)


def test_public_api_exports():
    for name in ssm_core.__all__:
        assert hasattr(ssm_core, name), name


def test_bidirectional_concat_model_in_other_dtype():
    """merge_proj must follow the model's device/dtype like every other layer."""
    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=16, ssm_cfg={"d_state": 4}, bidirectional=True,
                      bidirectional_strategy="concat")
    model = MambaLMHeadModel(cfg, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} >= {torch.float64}
    assert model.backbone.layers[0].mixer.merge_proj.weight.dtype == torch.float64
    assert model(torch.randint(0, 16, (1, 5))).logits.dtype == torch.float64
