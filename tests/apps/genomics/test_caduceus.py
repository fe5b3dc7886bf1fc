"""apps.genomics.caduceus: kuleshov-group Caduceus checkpoints (Hugging Face layout) load into our DNA models.

Fixtures are folders written in Caduceus's layout (config.json + model.safetensors / pytorch_model.bin, its key
names, HF's dropping of tied copies) with small random weights. ``caduceus_logits`` below is a plain re-statement
of Caduceus's forward (modeling_caduceus.py / modeling_rcps.py: RCPS embedding, per-layer RCPS wrappers with
their fused and unfused add+norm branches as written, BiMamba, RCPS LM head) with a naive Mamba scan loop; it
shares no code with hiss. The loaded DNAModel must give the same logits (fp32, <= 1e-4).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from apps.genomics.caduceus import caduceus_layout, finetune_flags, is_caduceus_dir, load_caduceus, main
from apps.genomics.data import A_ID, MASK_ID, N_ID, VOCAB_SIZE
from apps.genomics.model import DNAClassifier, DNAModel, complement_map, load_backbone_weights, rc_ids
from apps.genomics.predict import SequenceDict, load_model, per_base_loglik, read_variants, score_variants
from ssm_core import MambaConfig

pytestmark = pytest.mark.usefixtures("one_thread", "ref_backend")


@pytest.fixture(scope="module")
def ref_backend():
    """Tiny models: the pure-PyTorch scan, so no compiled-kernel build happens inside these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISS_BACKEND", "ref")
        yield


# our id -> the checkpoint's id, per tokenizer (HyenaDNA's = ours; the Caduceus repo's later 15-token one)
TOKENS = {"hyenadna": (list(range(12)), 12, 7), "caduceus-15": ([0, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], 15, 10)}
D_STATE, D_CONV, EXPAND = 4, 4, 2


# --- a Caduceus folder, written in its layout -------------------------------------------------------------
def caduceus_params(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """Every tensor CaduceusForMaskedLM's state_dict holds, tied ones as the same tensor object."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    d, V, rcps = cfg["d_model"], cfg["vocab_size"], cfg["rcps"]
    E, r = EXPAND * d, math.ceil(d / 16)
    p: dict[str, torch.Tensor] = {}
    pre = "caduceus.backbone."
    emb = pre + "embeddings.word_embeddings." + ("embedding.weight" if rcps else "weight")
    p[emb] = rnd(V, d, scale=0.7)
    comp = torch.tensor([cfg["complement_map"][str(i)] for i in range(V)]) if cfg["complement_map"] else None
    if rcps:
        p[pre + "embeddings.word_embeddings.complement_map"] = comp

    def mamba(name):
        m = {"in_proj.weight": rnd(2 * E, d, scale=d**-0.5), "conv1d.weight": rnd(E, 1, D_CONV, scale=0.5),
             "conv1d.bias": rnd(E, scale=0.1), "x_proj.weight": rnd(r + 2 * D_STATE, E, scale=E**-0.5),
             "dt_proj.weight": rnd(E, r, scale=0.5), "dt_proj.bias": torch.rand(E, generator=g) * 3 - 4,
             "A_log": torch.log(torch.rand(E, D_STATE, generator=g) * D_STATE + 1), "D": 1 + rnd(E, scale=0.3),
             "out_proj.weight": rnd(d, E, scale=E**-0.5)}
        return {f"{name}.{k}": v for k, v in m.items()}

    def norm(name):
        out = {f"{name}.weight": 1 + rnd(d, scale=0.3)}
        if not cfg["rms_norm"]:
            out[f"{name}.bias"] = rnd(d, scale=0.1)
        return out

    wrap = "submodule." if rcps and not cfg["fused_add_norm"] else ""
    for i in range(cfg["n_layer"]):
        mix = f"{pre}layers.{i}.mixer." + ("submodule." if rcps else "")
        p.update(mamba(mix + "mamba_fwd"))
        if cfg["bidirectional"]:
            p.update(mamba(mix + "mamba_rev"))
            if cfg["bidirectional_weight_tie"]:  # BiMambaWrapper ties in_proj and out_proj only
                for k in ("in_proj.weight", "out_proj.weight"):
                    p[mix + "mamba_rev." + k] = p[mix + "mamba_fwd." + k]
        p.update(norm(f"{pre}layers.{i}.norm.{wrap}".rstrip(".")))
    p.update(norm(f"{pre}norm_f.{wrap}".rstrip(".")))
    head = "lm_head.lm_head.weight" if rcps else "lm_head.weight"
    p[head] = p[emb] if cfg.get("tie_word_embeddings", True) else rnd(V, d, scale=0.7)
    if rcps:
        p["lm_head.complement_map"] = comp
    return p


def caduceus_config(*, rcps=True, fused=True, n_layer=2, d_model=8, bidirectional=True, tie=True, tie_head=True,
                    rms_norm=True, strategy="add", tokens="hyenadna") -> dict:
    _, vocab, a = TOKENS[tokens]
    padded = (vocab + 7) // 8 * 8  # Caduceus pads vocab_size and complement_map in place, then saves them
    comp = {str(i): i for i in range(padded)}
    comp.update({str(a): a + 3, str(a + 1): a + 2, str(a + 2): a + 1, str(a + 3): a})
    return {
        "architectures": ["CaduceusForMaskedLM"], "model_type": "caduceus", "d_model": d_model, "n_layer": n_layer,
        "vocab_size": padded, "pad_vocab_size_multiple": 8, "complement_map": comp,
        "ssm_cfg": {"d_state": D_STATE, "d_conv": D_CONV, "expand": EXPAND, "dt_rank": "auto", "dt_min": 0.001,
                    "dt_max": 0.1, "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True,
                    "bias": False, "use_fast_path": True},
        "rms_norm": rms_norm, "residual_in_fp32": False, "fused_add_norm": fused, "norm_epsilon": 1e-5,
        "initializer_cfg": {"initializer_range": 0.02, "n_residuals_per_layer": 1, "rescale_prenorm_residual": True},
        "bidirectional": bidirectional, "bidirectional_strategy": strategy, "bidirectional_weight_tie": tie,
        "rcps": rcps, "tie_word_embeddings": tie_head, "torch_dtype": "float32", "transformers_version": "4.38.1",
    }


def write_caduceus(folder, cfg: dict, fmt: str = "safetensors", seed: int = 0) -> dict[str, torch.Tensor]:
    """config.json + weights as CaduceusForMaskedLM.save_pretrained writes them: safetensors keeps one name of
    each tied set (the first registered: the embedding, mamba_fwd), torch.save keeps all. Returns all tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    params = caduceus_params(cfg, seed)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if fmt == "bin":
        torch.save(params, folder / "pytorch_model.bin")
    else:
        seen, kept = set(), {}
        for k, v in params.items():
            if id(v) not in seen:
                seen.add(id(v))
                kept[k] = v.contiguous()
        save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return params


# --- Caduceus's forward, restated ------------------------------------------------------------------------
def mamba_ref(p: dict, pre: str, x: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba (v1) forward, with a plain loop over positions for the selective scan."""
    E = p[pre + "D"].shape[0]
    xz = x @ p[pre + "in_proj.weight"].T
    u, z = xz[..., :E], xz[..., E:]
    k = p[pre + "conv1d.weight"].shape[-1]
    u = F.conv1d(F.pad(u.transpose(1, 2), (k - 1, 0)), p[pre + "conv1d.weight"], p[pre + "conv1d.bias"], groups=E)
    u = F.silu(u).transpose(1, 2)  # (B, L, E)
    n = p[pre + "A_log"].shape[1]
    r = p[pre + "x_proj.weight"].shape[0] - 2 * n
    dbc = u @ p[pre + "x_proj.weight"].T
    dt, Bm, Cm = dbc[..., :r], dbc[..., r:r + n], dbc[..., r + n:]
    delta = F.softplus(dt @ p[pre + "dt_proj.weight"].T + p[pre + "dt_proj.bias"])
    A = -torch.exp(p[pre + "A_log"])
    h = x.new_zeros(x.shape[0], E, n)
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * u[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    y = (torch.stack(ys, 1) + u * p[pre + "D"]) * F.silu(z)
    return y @ p[pre + "out_proj.weight"].T


def bimamba_ref(p, pre, x, cfg):
    out = mamba_ref(p, pre + "mamba_fwd.", x)
    if cfg["bidirectional"]:
        rev = mamba_ref(p, pre + "mamba_rev.", x.flip(1)).flip(1)
        out = out + rev if cfg["bidirectional_strategy"] == "add" else out * rev
    return out


def norm_ref(p, pre, x, cfg):
    if cfg["rms_norm"]:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_epsilon"]) * p[pre + "weight"]
    return F.layer_norm(x, x.shape[-1:], p[pre + "weight"], p[pre + "bias"], cfg["norm_epsilon"])


def rc(x):  # RCPSWrapper.rc: flip length and channels
    return x.flip(-2, -1)


def caduceus_logits(cfg: dict, params: dict, ids: torch.Tensor) -> torch.Tensor:
    """CaduceusForMaskedLM(ids).logits over the checkpoint's own ids."""
    p = {k.removeprefix("caduceus."): v.float() for k, v in params.items() if v.is_floating_point()}
    d, rcps, fused = cfg["d_model"], cfg["rcps"], cfg["fused_add_norm"]
    if rcps:
        comp = torch.tensor([cfg["complement_map"][str(i)] for i in range(cfg["vocab_size"])])
        E = p["backbone.embeddings.word_embeddings.embedding.weight"]
        h = torch.cat([E[ids], rc(E[comp[ids.flip(-1)]])], -1)  # RCPSEmbedding
    else:
        h = p["backbone.embeddings.word_embeddings.weight"][ids]
    res = None
    for i in range(cfg["n_layer"]):
        pre = f"backbone.layers.{i}."
        s = h if res is None else h + res
        if not rcps:  # mamba_ssm Block: add -> norm -> mixer
            res = s
            h = bimamba_ref(p, pre + "mixer.", norm_ref(p, pre + "norm.", s, cfg), cfg)
            continue
        if fused:  # RCPSMambaBlock's fused_add_norm branch, as written: "fwd" takes the second half
            fwd_in, rc_in = s[..., d:], rc(s[..., :d])
            hn = torch.cat([norm_ref(p, pre + "norm.", fwd_in, cfg), rc(norm_ref(p, pre + "norm.", rc_in, cfg))], -1)
            res = torch.cat([fwd_in, rc(rc_in)], -1)
        else:  # RCPSAddNormWrapper(norm)
            res = s
            nrm = pre + "norm.submodule."
            hn = torch.cat([norm_ref(p, nrm, s[..., :d], cfg), rc(norm_ref(p, nrm, rc(s[..., d:]), cfg))], -1)
        mix = pre + "mixer.submodule."  # RCPSWrapper(BiMambaWrapper)
        h = torch.cat([bimamba_ref(p, mix, hn[..., :d], cfg), rc(bimamba_ref(p, mix, rc(hn[..., d:]), cfg))], -1)
    s = h + res
    if not rcps:
        return norm_ref(p, "backbone.norm_f.", s, cfg) @ p["lm_head.weight"].T
    nf = "backbone.norm_f." + ("" if fused else "submodule.")
    out = torch.cat([norm_ref(p, nf, s[..., :d], cfg), rc(norm_ref(p, nf, rc(s[..., d:]), cfg))], -1)
    W = p["lm_head.lm_head.weight"]  # RCPSLMHead
    return out[..., :d] @ W.T + out[..., d:].flip(-1) @ W[comp].T


def our_ids(batch=2, L=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(A_ID, N_ID + 1, (batch, L), generator=g)
    x[torch.rand(batch, L, generator=g) < 0.15] = MASK_ID
    return x


CASES = {  # name: (config kwargs, weight file format)
    "bimamba-tied": ({"rcps": False}, "safetensors"),
    "ps-fused-even": ({}, "safetensors"),
    "ps-fused-odd": ({"n_layer": 3}, "safetensors"),
    "ps-unfused-layernorm": ({"fused": False, "rms_norm": False}, "safetensors"),
    "ps-untied-bin": ({"tie": False, "tie_head": False}, "bin"),
    "bimamba-15-tokens-bin": ({"rcps": False, "tokens": "caduceus-15"}, "bin"),
    "ps-15-tokens-odd": ({"n_layer": 1, "tokens": "caduceus-15", "d_model": 16}, "safetensors"),
    "one-way": ({"rcps": False, "bidirectional": False}, "safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_caduceus_forward(tmp_path, case):
    kwargs, fmt = CASES[case]
    cfg = caduceus_config(**kwargs)
    params = write_caduceus(tmp_path / "cad", cfg, fmt)
    assert is_caduceus_dir(tmp_path / "cad")
    model = load_caduceus(tmp_path / "cad")
    assert model.head_config.task == "mlm"
    assert model.head_config.backbone == ("rcps" if cfg["rcps"] else "bimamba" if cfg["bidirectional"] else "mamba")
    x = our_ids()
    ids_map = torch.tensor(TOKENS[kwargs.get("tokens", "hyenadna")][0])
    with torch.no_grad():
        ours = model(x)[..., :VOCAB_SIZE]
        theirs = caduceus_logits(cfg, params, ids_map[x])[..., ids_map]
    err = (ours - theirs).abs().max().item()
    print(f"{case}: max |logit difference| = {err:.2e} (logits up to {theirs.abs().max().item():.1f})")
    assert err <= 1e-4, err


def test_fused_rcps_blocks_really_swap_the_halves():
    """The fused and unfused RCPS branches compute different functions on the same weights, so the fixture's
    fused cases above do test the swap (and both are RC-equivariant)."""
    cfg = caduceus_config()
    params = caduceus_params(cfg, 0)
    for k in [k for k in params if ".norm." in k or ".norm_f." in k]:  # the unfused branch's key names
        params[k.replace(".norm.", ".norm.submodule.").replace(".norm_f.", ".norm_f.submodule.")] = params[k]
    x = our_ids()
    fused = caduceus_logits(cfg, params, x)
    unfused = caduceus_logits({**cfg, "fused_add_norm": False}, params, x)
    assert (fused - unfused).abs().max() > 1e-2
    comp = complement_map(16)
    rc_fused = caduceus_logits(cfg, params, rc_ids(x))
    assert (rc_fused.flip(1)[..., comp] - fused).abs().max() < 1e-4


@pytest.mark.parametrize("n_layer", [2, 3])
def test_loaded_caduceus_ps_is_rc_equivariant(tmp_path, n_layer):
    write_caduceus(tmp_path, caduceus_config(n_layer=n_layer))
    model = load_caduceus(tmp_path).double()
    assert model.rc_equivariant
    x = our_ids(3, 33)
    with torch.no_grad():
        a, b = model(x), model(rc_ids(x))
        fa, fb = model.backbone(x), model.backbone(rc_ids(x))
    assert (b.flip(1)[..., complement_map(a.shape[-1])] - a).abs().max() < 1e-10
    assert (fb.flip(1) - fa).abs().max() < 1e-10  # per-base features follow their base pair


def test_predict_finetune_and_round_trip(tmp_path):
    """predict.load_model / DNAModel.from_pretrained read the folder; masked-LM scoring runs; save_pretrained
    round-trips; --model.init_from copies the backbone into a classifier with the flags finetune_flags gives."""
    cad = tmp_path / "cad"
    write_caduceus(cad, caduceus_config(n_layer=3))
    model = load_model(cad)
    assert isinstance(model, DNAModel)
    x = our_ids(1, 24)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(DNAModel.from_pretrained(cad)(x), ref)
    ll = per_base_loglik(model, "ACGTTGCAACGTAGCT")
    assert ll.shape == (16,) and (ll < 0).all()
    genome = SequenceDict({"chr1": "ACGTTGCAACGTAGCTAGGCTA"})
    rows = score_variants(model, genome, read_variants("chr1 5 T C\n"), flank=8)
    assert len(rows) == 1 and math.isfinite(rows[0]["llr"])
    main([str(cad), "--out", str(tmp_path / "hiss")])  # convert once to our own format
    assert not is_caduceus_dir(tmp_path / "hiss")
    with torch.no_grad():
        assert torch.equal(DNAModel.from_pretrained(tmp_path / "hiss")(x), ref)

    cfg = caduceus_layout(json.loads((cad / "config.json").read_text())).config
    assert "--model.config.bidirectional_weight_tie=false" in finetune_flags(cfg)
    clf = DNAClassifier(cfg, num_labels=2, backbone="rcps", init_from=str(cad))
    with torch.no_grad():
        assert torch.equal(clf.model.backbone(x), model.backbone(x))
    plain = MambaConfig(d_model=8, n_layer=3, vocab_size=VOCAB_SIZE, ssm_cfg={"d_state": D_STATE})
    with pytest.raises(ValueError, match="bidirectional_weight_tie: yours True") as e:
        DNAClassifier(plain, num_labels=2, backbone="rcps", init_from=str(cad))
    assert "--model.config.bidirectional_weight_tie=false" in str(e.value)
    wrong = DNAModel(MambaConfig(**{**cfg.to_dict(), "d_model": 16}), model.head_config)
    with pytest.raises(ValueError, match="d_model: yours 16, the checkpoint's 8"):
        load_backbone_weights(wrong.backbone, cad)


def test_hiss_and_hf_mamba_folders_are_not_caduceus(tmp_path):
    from ssm_core import MambaLMHeadModel

    MambaLMHeadModel(MambaConfig(d_model=8, n_layer=1, vocab_size=VOCAB_SIZE)).save_pretrained(tmp_path / "lm")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "mamba", "rcps": True, "d_model": 8}))
    assert not is_caduceus_dir(tmp_path / "lm") and not is_caduceus_dir(tmp_path / "hf")
    assert not is_caduceus_dir(tmp_path / "nothing")


def test_token_ids_without_a_complement_map(tmp_path):
    """A non-RC checkpoint may lack complement_map: its tokenizer_config.json (where [MASK] is) or HyenaDNA's
    12-id vocab_size tells the ids; otherwise the error names complement_map."""
    cfg = {**caduceus_config(rcps=False), "complement_map": None}
    for mask_id, layout in (("3", "hyenadna"), ("6", "caduceus-15")):
        tok = {"added_tokens_decoder": {mask_id: {"content": "[MASK]", "special": True}}}
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tok))
        assert caduceus_layout(cfg, tmp_path).tokens == layout
    (tmp_path / "tokenizer_config.json").unlink()
    assert caduceus_layout({**cfg, "vocab_size": 12}, tmp_path).tokens == "hyenadna"
    with pytest.raises(ValueError, match="no complement_map"):
        caduceus_layout(cfg, tmp_path)
    # a hand-written config seen in the Caduceus repository holds "bidirectional": "true,"
    assert caduceus_layout({**cfg, "vocab_size": 12, "bidirectional": "true,"}, tmp_path).config.bidirectional


class NotATensor:
    pass


@pytest.mark.parametrize("change,match", [
    ({"bidirectional_strategy": "ew_multiply"}, "bidirectional_strategy='ew_multiply' is not supported"),
    ({"bidirectional": False}, "rcps=true with bidirectional=false"),
    ({"ssm_cfg": {"d_state": D_STATE, "headdim": 8}}, "ssm_cfg has keys"),
    ({"ssm_cfg": {"layer": "Mamba2"}}, "ssm_cfg.layer"),
    ({"complement_map": {"0": 1, "1": 0}}, "complement_map"),
    ({"complement_map": None}, "complement_map"),
    ({"rcps": "maybe"}, "rcps must be true or false"),
    ({"n_layer": 0}, "n_layer must be a positive int"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, change, match):
    write_caduceus(tmp_path, caduceus_config())
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=match):
        load_caduceus(tmp_path)


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    cfg = caduceus_config(rcps=False)
    params = write_caduceus(tmp_path / "a", cfg, "bin")
    rev = "caduceus.backbone.layers.0.mixer.mamba_rev.in_proj.weight"
    params[rev] = params[rev] + 1  # "tied" copies that differ
    torch.save(params, tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="should be the same tied tensor"):
        load_caduceus(tmp_path / "a")
    del params[rev], params[rev.replace("mamba_rev", "mamba_fwd")]
    torch.save(params, tmp_path / "a" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="no tensor 'backbone.layers.0.mixer.mamba_fwd.in_proj.weight'"):
        load_caduceus(tmp_path / "a")
    write_caduceus(tmp_path / "b", cfg)
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "ssm_cfg": {"d_state": 8}}))
    with pytest.raises(ValueError, match="do not match config.json"):
        load_caduceus(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg, "n_layer": 1}))
    with pytest.raises(ValueError, match="tensors this config does not use"):
        load_caduceus(tmp_path / "b")
    write_caduceus(tmp_path / "c", cfg)
    (tmp_path / "c" / "model.safetensors").unlink()
    torch.save({"x": NotATensor()}, tmp_path / "c" / "pytorch_model.bin")  # never unpickled
    with pytest.raises(ValueError, match="refused to load"):
        load_caduceus(tmp_path / "c")


@pytest.mark.parametrize("rcps", [True, False])
def test_printed_finetune_command_builds_and_trains(rcps, tmp_path, capsys):
    """`python -m apps.genomics.caduceus DIR` prints a finetune command; run as printed (plus a short trainer) it
    builds the classifier on the default task (splice, centre readout): for Caduceus-PS with mean pooling instead,
    since an RC-invariant backbone cannot read the centre position's strand."""
    import shlex

    from apps.genomics.finetune import main as finetune

    cad = tmp_path / "cad"
    write_caduceus(cad, caduceus_config(rcps=rcps, n_layer=2))
    main([str(cad)])
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("fine-tune from it: "))
    args = shlex.split(line.removeprefix("fine-tune from it: "))[3:]  # after "python -m apps.genomics.finetune"
    assert ("--model.pooling=mean" in args) == rcps
    finetune([*args, "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.callbacks.dirpath={tmp_path / 'export'}",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
