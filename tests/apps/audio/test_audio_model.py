"""apps/audio model: the U-Net's recurrent step equals its parallel forward (every block kind, conditional,
up-path-only), chunked reading with the state is exact, causality, checkpoints, chunked training gradients,
and `python -m apps.audio.train` end to end on the bundled sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from audio_support import tiny

from apps.audio.model import AudioLM, AudioUNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = Path(__file__).resolve().parents[3] / "datasets" / "samples" / "digits_small"


def stepped(model: AudioUNet, tokens: torch.Tensor, label=None, state=None) -> tuple[torch.Tensor, object]:
    state = state or model.empty_state(tokens.shape[0])
    out = []
    with torch.no_grad():
        for t in range(tokens.shape[1]):
            logits, state = model.step(tokens[:, t], state, label=label)
            out.append(logits)
    return torch.stack(out, 1), state


@pytest.mark.parametrize("kw", [
    {},                                                        # Mamba everywhere
    {"blocks": "lti"},                                          # the LTI ablation
    {"blocks": ["lti", "mamba", "attention"], "ff": 2},         # mixed levels, gated MLPs
    {"blocks": ["mamba", "mamba", "attention"], "ff": [0, 0, 0.875]},  # a Transformer centre only
    {"unet": False, "pool": [2, 4]},                            # SaShiMi's up-path-only layout, other pooling
    {"n_classes": 10},                                          # digit conditioning
    {"pool": [4], "n_layers": [2, 1]},                          # one stage
])
def test_recurrent_step_equals_parallel(kw):
    model = tiny(**kw)
    torch.manual_seed(1)
    tokens = torch.randint(0, 256, (2, 80))
    label = torch.tensor([3, -1]) if model.cond is not None else None
    with torch.no_grad():
        ref = model(tokens, label=label).logits
    rec, state = stepped(model, tokens, label)
    assert rec.shape == ref.shape == (2, 80, 256)
    assert float((rec - ref).abs().max()) <= 1e-4
    assert state.t == 80


def test_chunks_with_state_and_mixed_prefill_are_exact():
    model = tiny(n_classes=4)
    tokens = torch.randint(0, 256, (3, 96))
    label = torch.tensor([0, 2, -1])
    with torch.no_grad():
        ref = model(tokens, label=label).logits
        a = model(tokens[:, :32], label=label, return_state=True)
        b = model(tokens[:, 32:80], label=label, state=a.state, return_state=True)
        c = model(tokens[:, 80:], label=label, state=b.state)   # last piece: any length
    assert float((torch.cat([a.logits, b.logits, c.logits], 1) - ref).abs().max()) <= 1e-4
    rest, _ = stepped(model, tokens[:, 32:], label, state=a.state)  # parallel prefill, then steps
    assert float((rest - ref[:, 32:]).abs().max()) <= 1e-4
    with pytest.raises(ValueError, match="multiple of the total pooling 16"):
        model(tokens[:, :20], return_state=True)


def test_causal_with_one_step_shift():
    model = tiny()
    tokens = torch.randint(0, 256, (1, 64))
    changed = tokens.clone()
    changed[0, 37] = (changed[0, 37] + 100) % 256
    with torch.no_grad():
        diff = (model(changed).logits - model(tokens).logits).abs().amax(-1)[0]
    assert float(diff[:37].max()) == 0.0 and float(diff[37]) > 0  # logits[t] see tokens[<= t] only


def test_config_validation_and_conditioning_errors():
    with pytest.raises(ValueError, match="one entry per level"):
        UNetConfig(n_layers=[1, 2])
    with pytest.raises(ValueError, match="unknown block kind"):
        UNetConfig(blocks="s4")
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(torch.zeros(1, 16, dtype=torch.long), label=3)
    with pytest.raises(ValueError, match="out of range"):
        tiny(n_classes=10)(torch.zeros(1, 16, dtype=torch.long), label=10)


def test_save_and_load(tmp_path):
    model = tiny(n_classes=10, blocks=["mamba", "lti", "attention"])
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "hiss-audio-unet" and cfg["blocks"] == ["mamba", "lti", "attention"]
    again = AudioUNet.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(0, 256, (1, 48))
    with torch.no_grad():
        assert torch.equal(model(x, label=5).logits, again(x, label=5).logits)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2}))
    with pytest.raises(ValueError, match="not an apps.audio U-Net"):
        AudioUNet.from_pretrained(tmp_path / "other")


def test_chunked_training_loss_and_gradients_are_exact():
    torch.manual_seed(0)
    cfg = UNetConfig(d_model=8, n_layers=[1, 1, 1], ssm_cfg={"d_state": 4}, n_classes=3)
    one, chunked = AudioLM(cfg, cond_drop=0.0), AudioLM(cfg, chunk_len=32, cond_drop=0.0)
    chunked.model.load_state_dict(one.model.state_dict())
    ids = torch.randint(0, 256, (2, 96))
    labels = torch.roll(ids, -1, 1)
    labels[:, -5:] = -100
    batch = {"input_ids": ids, "labels": labels, "label": torch.tensor([1, -1])}
    grads = []
    for m in (one, chunked):
        loss, n = m.nll(batch)
        loss.backward()
        assert n == 2 * 91
        grads.append((float(loss.detach()), [p.grad.clone() for p in m.model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    for g1, g2 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g1, g2, atol=1e-5, rtol=1e-4)


def test_train_cli_end_to_end(tmp_path, capsys):
    from apps.audio.train import main

    out = tmp_path / "pretrained"
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model:
  config: {{d_model: 8, n_layers: [1, 1, 1], ssm_cfg: {{d_state: 4}}, n_classes: 10}}
data: {{source: sc09, root: {SAMPLE}, train_crop: 512, batch_size: 2, max_valid: 2, progress: false}}
trainer:
  max_steps: 2
  val_check_interval: 2
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {tmp_path}
  logger: {{class_path: pytorch_lightning.loggers.CSVLogger, init_args: {{save_dir: {tmp_path}, name: audio}}}}
  callbacks:
    - {{class_path: apps.common.callbacks.ExportPretrained, init_args: {{dirpath: {out}}}}}
    - {{class_path: apps.audio.evaluate.HeldOutNLL, init_args: {{split: test, max_clips: 3}}}}
""")
    cli = main(["--config", str(config)])
    assert cli.trainer.global_step == 2
    printed = capsys.readouterr().out
    assert "held-out nats_per_sample" in printed and "bits/sample" in printed
    assert json.loads((tmp_path / "audio" / "version_0" / "heldout.json").read_text())["clips"] == 3
    model = AudioUNet.from_pretrained(out)
    assert model.config.n_classes == 10 and model.config.d_model == 8


def test_ff_per_level_puts_mlps_only_where_asked():
    model = AudioUNet(UNetConfig(d_model=16, blocks=["mamba", "mamba", "attention"], ff=[0, 0, 0.875]))
    widths = {b.dim: (None if b.mlp is None else b.mlp.fc2.in_features) for b in model.blocks_in_order()}
    assert widths == {16: None, 32: None, 64: 56}  # 0.875 x 64
    with pytest.raises(ValueError, match="ff"):
        UNetConfig(ff=[1, 2])


def test_compare_default_variants_have_equal_parameters():
    """apps.audio.compare's default side by side: Mamba, LTI and Transformer-centre U-Nets within 1% in size."""
    import yaml

    from apps.audio.compare import VARIANTS

    base = yaml.safe_load((Path(__file__).resolve().parents[3] / "apps/audio/configs/default.yaml").read_text())
    sizes = {name: AudioUNet(UNetConfig(**{**base["model"]["config"], **VARIANTS[name]})).num_parameters()
             for name in ("mamba", "lti_n32", "transformer_centre")}
    assert all(abs(n / sizes["mamba"] - 1) < 0.01 for n in sizes.values()), sizes


@pytest.mark.parametrize("name", ["mamba", "lti_n32", "transformer_centre"])
def test_compare_variant_arguments_reach_the_model_config(name, capsys):
    """apps.audio.compare's command-line overrides parse into the variant's config (a plain string stays a name)."""
    import yaml

    from apps.audio.compare import VARIANTS, config_args
    from apps.audio.train import main

    with pytest.raises(SystemExit):
        main(["fit", *config_args(VARIANTS[name]), "--print_config"])
    config = UNetConfig(**yaml.safe_load(capsys.readouterr().out)["model"]["config"])
    want = UNetConfig(**{**config.to_dict(), **VARIANTS[name]})
    assert config == want and all(b in ("mamba", "lti", "attention") for b in config.blocks)


def test_sc09_config_trains_on_whole_clips_without_the_default_time_cap(capsys):
    """sc09_6m.yaml is read over default.yaml: it must not inherit the quick run's quarter-second crops or its
    10-minute cap (the paper's recipe is 1 s clips for 200k steps)."""
    import yaml

    from apps.audio.train import main

    cfg = Path(__file__).resolve().parents[3] / "apps/audio/configs/sc09_6m.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["train_crop"] is None and printed["data"]["clip_len"] == 16000
    assert printed["trainer"]["max_time"] is None and printed["trainer"]["max_steps"] == 200000
