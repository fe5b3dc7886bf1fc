"""Parity with other Mamba implementations and checkpoint formats.

* HF transformers MambaForCausalLM / Mamba2ForCausalLM: save_pretrained -> our from_pretrained,
  same logits, and our greedy decode agrees with HF's full-forward argmax.
* mambapy's MambaBlock: same parameter names, same forward, same recurrent step and cache.
* mamba_ssm's on-disk format (config.json + pytorch_model.bin), MambaByte-like vocab.
* Loader errors and our own save_pretrained round trip (atomic, no temp files left).

Run with ``-s`` to see the measured max-abs differences.
"""

import json
import os
import stat

import mambapy.mamba as mambapy_mamba
import pytest
import torch
import transformers

import ssm_core
from ssm_core import MambaConfig, MambaLMHeadModel

TOL = 1e-4  # fp32 logits / outputs


pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb(model: torch.nn.Module, scale: float = 0.02, seed: int = 0) -> None:
    """Add small noise to every parameter so that no weight is at its (structured) init value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _report(name: str, diff: float) -> None:
    print(f"\n[parity] {name}: max|diff| = {diff:.3e}")


def _no_tmp_files(directory) -> None:
    leftovers = [n for n in os.listdir(directory) if n.endswith(".tmp")]
    assert leftovers == [], f"temporary files left behind: {leftovers}"


# --------------------------------------------------------------------------------------------
# HF transformers
# --------------------------------------------------------------------------------------------

HF_VOCAB = 100


def _hf_mamba1(tmp_path, **overrides):
    cfg = transformers.MambaConfig(
        vocab_size=HF_VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, conv_kernel=4, expand=2,
        **overrides,
    )
    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(cfg).eval()
    _perturb(hf, seed=1)
    hf.save_pretrained(tmp_path)
    return hf


def _hf_mamba2(tmp_path, **overrides):
    cfg = transformers.Mamba2Config(
        vocab_size=HF_VOCAB, hidden_size=32, state_size=8, num_hidden_layers=2, num_heads=8, head_dim=8,
        n_groups=2, chunk_size=16, expand=2, **overrides,
    )
    torch.manual_seed(0)
    hf = transformers.Mamba2ForCausalLM(cfg).eval()
    _perturb(hf, seed=2)
    hf.save_pretrained(tmp_path)
    return hf


HF_CASES = {
    "mamba1": (_hf_mamba1, {}),
    "mamba1-bias-eps": (_hf_mamba1, {"use_bias": True, "layer_norm_epsilon": 1e-3, "time_step_rank": 3}),
    "mamba2-ngroups2": (_hf_mamba2, {}),
    # Mamba-2's gated output norm uses layer_norm_epsilon in HF; a non-default value must carry over
    "mamba2-eps": (_hf_mamba2, {"layer_norm_epsilon": 1e-2}),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_hf_logits_parity(case, tmp_path):
    build, overrides = HF_CASES[case]
    hf = build(tmp_path, **overrides)
    ours = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert ours.config.vocab_size == HF_VOCAB
    # 37: not a multiple of chunk_size
    ids = torch.randint(0, HF_VOCAB, (2, 37), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        out = ours(ids).logits[..., :HF_VOCAB]
    assert out.shape == ref.shape == (2, 37, HF_VOCAB)
    diff = (out - ref).abs().max().item()
    _report(f"HF {case} logits (fp32, L=37)", diff)
    assert diff <= TOL
    assert ref.abs().max() > 0.1  # not a trivially tiny comparison


@pytest.mark.parametrize("case", ["mamba1", "mamba2-ngroups2"])
def test_hf_greedy_decode_matches_full_forward_argmax(case, tmp_path):
    """Our stateful greedy decode (prefill + one step per token) against HF's one-shot forward."""
    build, overrides = HF_CASES[case]
    hf = build(tmp_path, **overrides)
    ours = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    prompt = torch.randint(0, HF_VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    new = 12
    seq = ours.generate(prompt, max_new_tokens=new, temperature=0)
    assert seq.shape == (2, 5 + new)
    assert torch.equal(seq[:, :5], prompt)
    with torch.no_grad():
        logits = hf(seq).logits[:, 4:-1]  # logits that predict positions 5 .. 5+new-1
    chosen = logits.gather(-1, seq[:, 5:, None]).squeeze(-1)
    best = logits.max(-1).values
    gap = (best - chosen).max().item()
    exact = (logits.argmax(-1) == seq[:, 5:]).float().mean().item()
    _report(f"HF {case} greedy: HF-max minus HF-logit-of-our-token (worst of {2 * new})", gap)
    print(f"[parity] HF {case} greedy: exact argmax agreement {exact:.0%}")
    # our token is HF's argmax up to fp32 noise (exact ties aside, it is the same token)
    assert gap <= TOL
    assert exact >= 0.9


# --------------------------------------------------------------------------------------------
# mambapy
# --------------------------------------------------------------------------------------------

MAMBA_PARAM_NAMES = {
    "in_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias",
    "A_log", "D", "out_proj.weight",
}


def _mambapy_pair():
    cfg = mambapy_mamba.MambaConfig(d_model=24, n_layers=1, d_state=8, d_conv=4, expand_factor=2)
    torch.manual_seed(0)
    ref = mambapy_mamba.MambaBlock(cfg).eval()
    _perturb(ref, scale=0.05, seed=5)
    ours = ssm_core.Mamba(24, d_state=8, d_conv=4, expand=2).eval()
    assert set(dict(ref.named_parameters())) == MAMBA_PARAM_NAMES
    assert set(dict(ours.named_parameters())) == MAMBA_PARAM_NAMES
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours, cfg


def test_mambapy_block_forward_parity():
    ref, ours, _ = _mambapy_pair()
    x = torch.randn(3, 29, 24, generator=torch.Generator().manual_seed(6))  # 29: not a power of two
    with torch.no_grad():
        a, b = ref(x), ours(x)
    diff = (a - b).abs().max().item()
    _report("mambapy MambaBlock forward (fp32, L=29)", diff)
    assert diff <= TOL
    assert a.abs().max() > 1e-2


def test_mambapy_step_parity():
    """mambapy's step carries (h, last conv inputs); ours SSMState(conv, ssm) with the same meaning."""
    ref, ours, cfg = _mambapy_pair()
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(7))
    cache = (None, torch.zeros(2, cfg.d_inner, cfg.d_conv - 1))
    state = ours.empty_state(2)
    worst_y = worst_state = 0.0
    with torch.no_grad():
        full = ours(x)
        for t in range(x.shape[1]):
            y_ref, cache = ref.step(x[:, t], cache)
            y, state = ours(x[:, t : t + 1], state=state, return_state=True)
            worst_y = max(worst_y, (y[:, 0] - y_ref).abs().max().item())
            worst_state = max(worst_state, (state.ssm - cache[0]).abs().max().item(),
                              (state.conv - cache[1]).abs().max().item())
        worst_full = (full[:, -1] - y_ref).abs().max().item()
    _report("mambapy step outputs (9 tokens)", worst_y)
    _report("mambapy step cache (h, conv inputs) vs our SSMState", worst_state)
    assert worst_y <= TOL and worst_state <= TOL and worst_full <= TOL


# --------------------------------------------------------------------------------------------
# mamba_ssm checkpoint format: config.json + pytorch_model.bin
# --------------------------------------------------------------------------------------------

MAMBA_SSM_FIELDS = ("d_model", "n_layer", "vocab_size", "ssm_cfg", "rms_norm", "residual_in_fp32",
                    "fused_add_norm", "pad_vocab_size_multiple")


def _write_mamba_ssm_checkpoint(directory, model: MambaLMHeadModel) -> None:
    cfg = {k: getattr(model.config, k) for k in MAMBA_SSM_FIELDS}
    (directory / "config.json").write_text(json.dumps(cfg))
    state = model.state_dict()
    assert "lm_head.weight" in state  # mamba_ssm saves the tied head too
    torch.save(state, directory / "pytorch_model.bin")


MAMBA_SSM_CASES = {
    "mamba1": dict(d_model=32, n_layer=2, vocab_size=101, ssm_cfg={"d_state": 8}),
    "mamba2": dict(d_model=32, n_layer=2, vocab_size=101,
                   ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 16}),
    "mambabyte": dict(d_model=32, n_layer=2, vocab_size=256, pad_vocab_size_multiple=8,
                      ssm_cfg={"d_state": 8}),
}


@pytest.mark.parametrize("case", list(MAMBA_SSM_CASES))
def test_mamba_ssm_checkpoint_format(case, tmp_path):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**MAMBA_SSM_CASES[case])).eval()
    _perturb(model, seed=8)
    _write_mamba_ssm_checkpoint(tmp_path, model)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.ssm_layer == model.config.ssm_layer
    assert loaded.config.padded_vocab_size == model.config.padded_vocab_size
    assert loaded.lm_head.weight is loaded.backbone.embedding.weight  # tie survives loading
    ids = torch.randint(0, model.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max().item()
    _report(f"mamba_ssm format {case} reload", diff)
    assert diff == 0.0


def test_mambabyte_vocab():
    cfg = MambaConfig(**MAMBA_SSM_CASES["mambabyte"])
    assert cfg.padded_vocab_size == 256
    odd = MambaConfig(d_model=32, n_layer=1, vocab_size=257, pad_vocab_size_multiple=8)
    assert odd.padded_vocab_size == 264
    model = MambaLMHeadModel(cfg)
    assert model.lm_head.weight.shape == (256, 32)


# --------------------------------------------------------------------------------------------
# loader errors
# --------------------------------------------------------------------------------------------

SMALL = dict(d_model=16, n_layer=2, vocab_size=64, ssm_cfg={"d_state": 4})


def _mamba_ssm_dir(tmp_path, mutate):
    model = MambaLMHeadModel(MambaConfig(**SMALL))
    _write_mamba_ssm_checkpoint(tmp_path, model)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    mutate(state)
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


def test_missing_key_is_named(tmp_path):
    _mamba_ssm_dir(tmp_path, lambda s: s.pop("backbone.layers.1.mixer.D"))
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.mixer\.D"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_unexpected_key_is_named(tmp_path):
    _mamba_ssm_dir(tmp_path, lambda s: s.__setitem__("backbone.layers.0.mixer.surprise", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.surprise"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    _mamba_ssm_dir(tmp_path, lambda s: s.__setitem__("backbone.layers.0.mixer.A_log", torch.zeros(32, 5)))
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.A_log"):
        MambaLMHeadModel.from_pretrained(tmp_path)


def test_missing_config_names_path(tmp_path):
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError) as info:
        MambaLMHeadModel.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_missing_directory_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        MambaLMHeadModel.from_pretrained(missing)


def test_invalid_json_names_line_and_column(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "d_model": 16,\n  "n_layer": ,\n}')
    with pytest.raises(ValueError) as info:
        MambaLMHeadModel.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "line 3" in msg and "column 14" in msg and "config.json" in msg


# --------------------------------------------------------------------------------------------
# our save_pretrained
# --------------------------------------------------------------------------------------------

ROUND_TRIP = {
    "mamba1": SMALL,
    "mamba2-untied": dict(d_model=16, n_layer=2, vocab_size=50, tie_embeddings=False,
                          ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8}),
    "hybrid": dict(d_model=16, n_layer=2, vocab_size=64, d_intermediate=16, attn_layer_idx=[1],
                   attn_cfg={"num_heads": 2, "rotary_emb_dim": 4}, ssm_cfg={"d_state": 4}),
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_save_pretrained_round_trip(case, tmp_path):
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(**ROUND_TRIP[case])).eval()
    _perturb(model, seed=10)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    if not model.config.tie_embeddings:
        assert loaded.lm_head.weight is not loaded.backbone.embedding.weight


def test_save_pretrained_replaces_existing_checkpoint(tmp_path):
    first = MambaLMHeadModel(MambaConfig(**SMALL))
    first.save_pretrained(tmp_path)
    other_cfg = dict(SMALL, n_layer=3, d_model=24)
    second = MambaLMHeadModel(MambaConfig(**other_cfg)).eval()
    second.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    _no_tmp_files(tmp_path)
    loaded = MambaLMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.n_layer == 3 and loaded.config.d_model == 24
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, second(ids).logits)


def test_failed_save_keeps_old_checkpoint(tmp_path, monkeypatch):
    """A crash while writing the weights must leave the previous checkpoint intact and no temp file."""
    import safetensors.torch

    old = MambaLMHeadModel(MambaConfig(**SMALL)).eval()
    old.save_pretrained(tmp_path)
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def explode(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", explode)
    new = MambaLMHeadModel(MambaConfig(**dict(SMALL, n_layer=3)))
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
    loaded = MambaLMHeadModel.from_pretrained(tmp_path)
    assert loaded.config == old.config


def test_saved_config_respects_umask(tmp_path):
    """config.json gets the permissions a plain open() gives (as HF's config.json does), not mkstemp's 0600.
    (model.safetensors is left to safetensors, which itself creates 0600 files as of 0.8.)"""
    umask = os.umask(0o022)
    try:
        MambaLMHeadModel(MambaConfig(**SMALL)).save_pretrained(tmp_path)
    finally:
        os.umask(umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "config.json").st_mode)
    assert mode == 0o644, f"config.json: mode {oct(mode)}"
