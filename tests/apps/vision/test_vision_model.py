"""Vim model: hustvl checkpoint parity against an independent re-implementation of hustvl's forward, timm
registration and interface, position-embedding resampling, head replacement, bad checkpoints.

Parity tolerance: fp32, max |logit difference| <= 1e-4 (logits are O(1); the difference measured is ~1e-6,
from the order of floating-point sums in the chunked scan vs the step-by-step loop below).
"""

from __future__ import annotations

import argparse
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import apps.vision  # noqa: F401 - registers vim_* in timm
from apps.vision.model import (
    CheckpointError,
    VisionMamba,
    infer_vim_variant,
    load_hustvl,
    load_vision_model,
    read_checkpoint,
    resample_pos_embed,
    save_vision_model,
)
from ssm_core import Bidirectional, BiMambaV2, Mamba

torch.set_num_threads(1)  # tiny models on a shared 2-core box: one thread is fastest
TOL = 1e-4

# A tiny Vim in hustvl's layout: 32x32 RGB, patch 8 (16 patches + the middle class token), width 32, 2 layers
DIM, DEPTH, N, R, E, K, CLASSES = 32, 2, 16, 2, 64, 4, 7  # d_model, layers, d_state, dt_rank, d_inner, d_conv


def hustvl_state_dict(img=32, patch=8, stride=8, seed=0) -> dict[str, torch.Tensor]:
    """Random weights under hustvl/Vim's key names and shapes, scaled like trained weights."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    grid = (img - patch) // stride + 1
    sd = {"patch_embed.proj.weight": rnd(DIM, 3, patch, patch, scale=0.05), "patch_embed.proj.bias": rnd(DIM),
          "cls_token": rnd(1, 1, DIM), "pos_embed": rnd(1, grid * grid + 1, DIM),
          "norm_f.weight": 1 + rnd(DIM, scale=0.1), "head.weight": rnd(CLASSES, DIM), "head.bias": rnd(CLASSES)}
    for i in range(DEPTH):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + rnd(DIM, scale=0.1)
        sd[p + "mixer.in_proj.weight"] = rnd(2 * E, DIM)
        sd[p + "mixer.out_proj.weight"] = rnd(DIM, E)
        for s in ("", "_b"):
            sd[p + f"mixer.conv1d{s}.weight"] = rnd(E, 1, K, scale=0.3)
            sd[p + f"mixer.conv1d{s}.bias"] = rnd(E)
            sd[p + f"mixer.x_proj{s}.weight"] = rnd(R + 2 * N, E)
            sd[p + f"mixer.dt_proj{s}.weight"] = rnd(E, R, scale=0.5)
            sd[p + f"mixer.dt_proj{s}.bias"] = torch.log(torch.expm1(torch.rand(E, generator=g) * 0.1 + 1e-3))
        sd[p + "mixer.A_log"] = torch.log(torch.arange(1, N + 1).float().repeat(E, 1)) + rnd(E, N, scale=0.1)
        sd[p + "mixer.A_b_log"] = torch.log(torch.arange(1, N + 1).float().repeat(E, 1)) + rnd(E, N, scale=0.1)
        sd[p + "mixer.D"] = 1 + rnd(E)
        sd[p + "mixer.D_b"] = 1 + rnd(E)
    return sd


def write_hustvl_pth(path, sd):
    """The file as hustvl's main.py saves it: model, model_ema, optimizer, lr_scheduler, epoch, scaler, args."""
    args = argparse.Namespace(model="vim_tiny_patch16_224_bimambav2_final_pool_mean_abs_pos_embed_with_midclstok_div2",
                              nb_classes=CLASSES, input_size=32, lr=5e-4, batch_size=128)
    torch.save({"model": sd, "model_ema": {k: v + 0.01 for k, v in sd.items()},
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": [0, 1]}]},
                "lr_scheduler": {"last_epoch": 299}, "epoch": 299, "scaler": {"scale": 65536.0}, "args": args}, path)
    return path


# --- an independent, straightforward re-implementation of hustvl's VisionMamba.forward (no ssm_core) ----------

def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def mamba_inner(x, z, sd, p, s):
    """hustvl mamba_inner_fn_no_out_proj for one direction: x, z: (B, L, E) -> (B, L, E), a Python loop."""
    L = x.shape[1]
    xc = F.silu(F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), sd[p + f"conv1d{s}.weight"],
                         sd[p + f"conv1d{s}.bias"], groups=E)).transpose(1, 2)
    dbc = xc @ sd[p + f"x_proj{s}.weight"].T
    dt, Bm, Cm = dbc[..., :R], dbc[..., R:R + N], dbc[..., R + N:]
    delta = F.softplus(dt @ sd[p + f"dt_proj{s}.weight"].T + sd[p + f"dt_proj{s}.bias"])
    A = -torch.exp(sd[p + ("A_log" if s == "" else "A_b_log")])
    D = sd[p + f"D{s}"]
    h = torch.zeros(x.shape[0], E, N)
    ys = []
    for t in range(L):
        h = torch.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * Bm[:, t, None, :] * xc[:, t, :, None]
        ys.append((h * Cm[:, t, None, :]).sum(-1) + D * xc[:, t])
    return torch.stack(ys, 1) * F.silu(z)


def hustvl_forward(sd, images, stride=8):
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
    x = x.flatten(2).transpose(1, 2)
    M = x.shape[1]
    pos = M // 2
    x = torch.cat([x[:, :pos], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, pos:]], 1) + sd["pos_embed"]
    residual, hidden = None, x
    for i in range(DEPTH):  # hustvl Block: residual = residual + hidden; hidden = mixer(norm(residual))
        p = f"layers.{i}.mixer."
        residual = hidden if residual is None else residual + hidden
        h = rms(residual, sd[f"layers.{i}.norm.weight"])
        xz = h @ sd[p + "in_proj.weight"].T
        xx, z = xz[..., :E], xz[..., E:]
        fwd = mamba_inner(xx, z, sd, p, "")
        bwd = mamba_inner(xx.flip(1), z.flip(1), sd, p, "_b").flip(1)
        hidden = ((fwd + bwd) / 2) @ sd[p + "out_proj.weight"].T
    out = rms(residual + hidden, sd["norm_f.weight"])
    return out[:, pos] @ sd["head.weight"].T + sd["head.bias"]


TINY = {"img_size": 32, "patch_size": 8, "embed_dim": DIM, "depth": DEPTH}


@pytest.fixture(scope="module")
def hustvl_file(tmp_path_factory):
    return write_hustvl_pth(tmp_path_factory.mktemp("hustvl") / "vim_t_midclstok_tiny.pth", hustvl_state_dict())


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_logit_parity_with_hustvl_forward_via_timm_pretrained(hustvl_file, images):
    model = timm.create_model("vim_tiny_patch16_224", pretrained=True, num_classes=CLASSES,
                              pretrained_cfg_overlay={"file": str(hustvl_file)}, **TINY).eval()
    sd = read_checkpoint(hustvl_file)
    with torch.no_grad():
        ours, ref = model(images), hustvl_forward(sd, images)
    assert ours.shape == (3, CLASSES)
    assert (ours - ref).abs().max() <= TOL


def test_parity_reference_backend_and_ema(hustvl_file, images, monkeypatch):
    monkeypatch.setenv("HISS_BACKEND", "ref")
    model = timm.create_model("vim_tiny_patch16_224", num_classes=CLASSES, **TINY).eval()
    load_hustvl(hustvl_file, model, use_ema=True)
    ema = read_checkpoint(hustvl_file, use_ema=True)  # the allow-listed loader, never a full unpickle
    with torch.no_grad():
        assert (model(images) - hustvl_forward(ema, images)).abs().max() <= TOL


def test_stride8_variant_parity(tmp_path, images):
    sd = hustvl_state_dict(img=32, patch=8, stride=4)
    f = write_hustvl_pth(tmp_path / "s8.pth", sd)
    model = timm.create_model("vim_tiny_patch16_stride8_224", num_classes=CLASSES, **dict(TINY, stride=4)).eval()
    assert model.patch_embed.num_patches == 49 and model.cls_index == 24
    load_hustvl(f, model)
    with torch.no_grad():
        assert (model(images) - hustvl_forward(sd, images, stride=4)).abs().max() <= TOL


def test_pos_embed_bicubic_resampling_keeps_middle_class_token(hustvl_file):
    sd = read_checkpoint(hustvl_file)
    model = timm.create_model("vim_tiny_patch16_224", num_classes=CLASSES, **dict(TINY, img_size=48)).eval()
    report = load_hustvl(hustvl_file, model)
    assert report == {"head_replaced": False, "pos_embed_resampled": True}
    pe = sd["pos_embed"]  # 4x4 grid, class token at index 8
    grid = torch.cat([pe[:, :8], pe[:, 9:]], 1).reshape(1, 4, 4, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    want = torch.cat([want[:, :18], pe[:, 8:9], want[:, 18:]], 1)
    assert torch.allclose(model.pos_embed.data, want, atol=1e-6)
    # and the network at 48x48 equals hustvl's forward with that position embedding
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert (model(x) - hustvl_forward(dict(sd, pos_embed=want), x)).abs().max() <= TOL
    assert torch.equal(resample_pos_embed(pe, (4, 4), (4, 4)), pe)


def test_head_replacement_for_a_new_class_count(hustvl_file, images):
    model = timm.create_model("vim_tiny_patch16_224", num_classes=5, **TINY).eval()
    assert load_hustvl(hustvl_file, model)["head_replaced"]
    sd = read_checkpoint(hustvl_file)
    ref_model = timm.create_model("vim_tiny_patch16_224", num_classes=CLASSES, **TINY).eval()
    load_hustvl(hustvl_file, ref_model)
    with torch.no_grad():
        assert model(images).shape == (3, 5)
        feats = model.forward_head(model.forward_features(images), pre_logits=True)
        assert torch.allclose(feats, ref_model.forward_head(ref_model.forward_features(images), pre_logits=True))
    assert not torch.equal(model.head.weight[:5], sd["head.weight"][:5])


def test_load_vision_model_infers_the_variant_from_a_hustvl_file(hustvl_file, images):
    name, kwargs = infer_vim_variant(read_checkpoint(hustvl_file))
    assert name == "vim_tiny_patch16_224" and kwargs["embed_dim"] == DIM and kwargs["img_size"] == 32
    assert kwargs["patch_size"] == 8 and kwargs["depth"] == DEPTH and kwargs["num_classes"] == CLASSES
    model, cfg = load_vision_model(hustvl_file, img_size=32)
    with torch.no_grad():
        assert (model(images) - hustvl_forward(read_checkpoint(hustvl_file), images)).abs().max() <= TOL


def test_bad_checkpoints_name_the_file(tmp_path, hustvl_file):
    model = timm.create_model("vim_tiny_patch16_224", num_classes=CLASSES, **TINY)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(hustvl_file.read_bytes()[:5000])

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": Evil()}, evil)
    for f in (empty, truncated, evil):
        with pytest.raises(CheckpointError, match=f.name):
            load_hustvl(f, model)
    deeper = timm.create_model("vim_tiny_patch16_224", num_classes=CLASSES, **dict(TINY, depth=3))
    with pytest.raises(CheckpointError, match=r"vim_t_midclstok_tiny.pth.*missing"):
        load_hustvl(hustvl_file, deeper)
    with pytest.raises(FileNotFoundError):
        load_hustvl(tmp_path / "nope.pth", model)


def test_timm_interface():
    m = timm.create_model("vim_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8, embed_dim=32, depth=3,
                          drop_path_rate=0.2, in_chans=1)
    assert isinstance(m, VisionMamba) and m.pretrained_cfg["input_size"] == (1, 32, 32)
    assert len(m.pretrained_cfg["mean"]) == 1
    assert [type(b.drop_path).__name__ for b in m.layers] == ["Identity", "DropPath", "DropPath"]
    x = torch.randn(2, 1, 32, 32)
    feats = m.forward_features(x)
    assert feats.shape == (2, 17, 32) and m.cls_index == 8
    assert m.forward_head(feats, pre_logits=True).shape == (2, 32)
    m.reset_classifier(3, global_pool="mean")
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    m.reset_classifier(0, global_pool="none")
    assert m(x).shape == (2, 17, 32)
    m.reset_classifier(3, global_pool="last")
    loss = m(x).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if n != "cls_token" or True)
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_b_log", "layers.0.mixer.D_b"} <= m.no_weight_decay()
    from timm.optim import param_groups_layer_decay
    groups = param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.75)
    assert len({g["lr_scale"] for g in groups}) == 3 + 2  # stem, 3 layers, head
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 1, 32, 32\)"):
        m(torch.randn(1, 1, 40, 40))
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("vim_tiny_patch16_224", global_pool="max", img_size=32, depth=1)
    m.set_grad_checkpointing(True)
    m.train()
    m(x).sum().backward()


def test_registered_sizes_match_hustvl():
    with torch.device("meta"):
        counts = {n: sum(p.numel() for p in timm.create_model(n).parameters())
                  for n in ("vim_tiny_patch16_224", "vim_small_patch16_224")}
        s8 = timm.create_model("vim_tiny_patch16_stride8_224")
    assert 7.0e6 < counts["vim_tiny_patch16_224"] < 7.3e6  # hustvl: 7M
    assert 25.5e6 < counts["vim_small_patch16_224"] < 26.5e6  # hustvl: 26M
    assert s8.patch_embed.grid_size == (27, 27) and s8.pos_embed.shape[1] == 730


def test_bimamba_v2_equals_two_ssm_core_mambas_sharing_projections():
    """BiMambaV2 = Bidirectional(Mamba_fwd, Mamba_bwd, merge='mean') when both Mambas share in/out_proj."""
    torch.manual_seed(0)
    mix = BiMambaV2(16, d_state=8)
    f, b = Mamba(16, d_state=8), Mamba(16, d_state=8)
    sd = mix.state_dict()
    f.load_state_dict({k: v for k, v in sd.items() if not k.endswith("_b.weight") and not k.endswith("_b.bias")
                       and k not in ("A_b_log", "D_b")})
    b.load_state_dict({"in_proj.weight": sd["in_proj.weight"], "out_proj.weight": sd["out_proj.weight"],
                       "conv1d.weight": sd["conv1d_b.weight"], "conv1d.bias": sd["conv1d_b.bias"],
                       "x_proj.weight": sd["x_proj_b.weight"], "dt_proj.weight": sd["dt_proj_b.weight"],
                       "dt_proj.bias": sd["dt_proj_b.bias"], "A_log": sd["A_b_log"], "D": sd["D_b"]})
    x = torch.randn(2, 11, 16, requires_grad=True)
    want = Bidirectional(f, b, merge="mean")(x)
    got = mix(x)
    assert torch.allclose(got, want, atol=1e-6)
    # gradients too: the input's, and each parameter's (shared projections get both directions' share)
    w = torch.randn_like(want)
    (want * w).sum().backward()
    gx_want, x.grad = x.grad, None
    (got * w).sum().backward()
    assert torch.allclose(x.grad, gx_want, atol=1e-5)
    g = dict(mix.named_parameters())
    for name in ("in_proj.weight", "out_proj.weight"):
        shared = dict(f.named_parameters())[name].grad + dict(b.named_parameters())[name].grad
        assert torch.allclose(g[name].grad, shared, atol=1e-5), name
    for mine, theirs in (("conv1d_b.weight", b.conv1d.weight), ("x_proj_b.weight", b.x_proj.weight),
                         ("dt_proj_b.bias", b.dt_proj.bias), ("A_b_log", b.A_log), ("D_b", b.D),
                         ("conv1d.weight", f.conv1d.weight), ("A_log", f.A_log)):
        assert torch.allclose(g[mine].grad, theirs.grad, atol=1e-5), mine
    with pytest.raises(ValueError, match="no streaming state"):
        mix(x, return_state=True)


def test_save_and_load_our_format(tmp_path):
    m = timm.create_model("vim_tiny_patch16_224", num_classes=3, **TINY).eval()
    kwargs = dict(TINY)
    save_vision_model(m, tmp_path / "ck", "vim_tiny_patch16_224", kwargs, ["a", "b", "c"])
    m2, cfg = load_vision_model(tmp_path / "ck")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))
    assert cfg["class_names"] == ["a", "b", "c"] and cfg["data_config"]["input_size"] == [3, 32, 32]
    m3, cfg3 = load_vision_model(tmp_path / "ck", num_classes=5, img_size=48)  # fine-tuning: new head, new size
    assert m3(torch.randn(1, 3, 48, 48)).shape == (1, 5) and cfg3["class_names"] is None
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vision_model(tmp_path)
    assert math.isfinite(float(m3.pos_embed.detach().sum()))


def test_stride16_checkpoint_into_a_stride8_model(hustvl_file):
    """hustvl's long-sequence fine-tuning start: a patch-8/stride-8 checkpoint (4x4 grid) into stride 4 (7x7)."""
    model = timm.create_model("vim_tiny_patch16_stride8_224", num_classes=CLASSES, **dict(TINY, stride=4)).eval()
    assert load_hustvl(hustvl_file, model)["pos_embed_resampled"]
    assert model.pos_embed.shape == (1, 50, DIM)
    cls = read_checkpoint(hustvl_file)["pos_embed"][0, 8]
    assert torch.equal(model.pos_embed.data[0, 24], cls)  # the class token's entry moved to the new middle


def test_conv_stem_keeps_the_token_grid_and_round_trips(tmp_path):
    """stem_channels=(c1, c2): two 3x3 stride-2 convs then a (patch / 4)-sized projection, the same token grid as
    the plain patchify; grey input; saved and reloaded (our format) to identical logits."""
    kw = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_classes=10)
    plain = timm.create_model("vim_tiny_patch16_224", **kw)
    stem = timm.create_model("vim_tiny_patch16_224", stem_channels=(8, 16), **kw).eval()
    assert stem.patch_embed.grid_size == plain.patch_embed.grid_size == (7, 7)
    assert stem.patch_embed.proj.kernel_size == (1, 1) and stem.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(3, 1, 28, 28)
    save_vision_model(stem, tmp_path / "ck", "vim_tiny_patch16_224", dict(kw, stem_channels=[8, 16]), None)
    again, _ = load_vision_model(tmp_path / "ck")
    with torch.no_grad():
        assert torch.equal(stem(x), again(x))
    stem.train()
    stem(x).sum().backward()
    assert stem.patch_embed.stem[0].weight.grad is not None
    with pytest.raises(ValueError, match="multiple of 8"):
        timm.create_model("vim_tiny_patch16_224", stem_channels=(8, 16, 32), **kw)


def test_timm_deit_takes_the_same_conv_stem(tmp_path):
    """stem_channels on timm's own DeiT (the like-for-like baseline) goes in as its embed_layer; our format
    saves and reloads it."""
    from apps.vision.model import create_vision_model

    kw = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=10,
              stem_channels=[8, 16])
    deit = create_vision_model("deit_tiny_patch16_224", **kw).eval()
    assert type(deit).__name__ == "VisionTransformer" and deit.patch_embed.grid_size == (7, 7)
    assert deit.pos_embed.shape[1] == 50 and deit.pretrained_cfg["input_size"] == (1, 28, 28)
    x = torch.randn(2, 1, 28, 28)
    save_vision_model(deit, tmp_path / "d", "deit_tiny_patch16_224", kw, None)
    again, _ = load_vision_model(tmp_path / "d")
    with torch.no_grad():
        assert torch.equal(deit(x), again(x))
