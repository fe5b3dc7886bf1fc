"""apps/audio generation: the compiled whole-network step equals the Python step and the parallel forward,
prompt prefill + continuation, sampling, the generate CLI (WAV files out), evaluate CLI, the demo handlers,
and the shipped checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from audio_support import needs_fast, tiny

from apps.audio.data import SILENCE_TOKEN, mu_law_encode, read_audio, write_audio
from apps.audio.fast import FastStepper, fast_unavailable_reason
from apps.audio.generate import DEFAULT_CKPT, generate, prefill, stream
from apps.audio.model import AudioUNet

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = Path(__file__).resolve().parents[3] / "datasets" / "samples" / "digits_small"


@pytest.mark.parametrize("kw", [{"n_classes": 10}, {"blocks": ["lti", "mamba", "lti"], "ff": 2, "unet": False},
                                {"pool": [2, 2, 4], "n_layers": 1}])
def test_compiled_step_equals_parallel(kw):
    model = tiny(**kw)
    needs_fast(model)
    tokens = torch.randint(0, 256, (3, 96))
    label = torch.tensor([4, -1, 9]) if model.cond is not None else None
    with torch.no_grad():
        ref = model(tokens, label=label).logits
        state = model(tokens[:, :32], label=label, return_state=True).state
    fast = FastStepper(model, state, label, threads=2)
    got = torch.stack([fast.step(tokens[:, t]) for t in range(32, 96)], 1)
    assert float((got - ref[:, 32:]).abs().max()) <= 1e-4
    assert fast.t == 96
    with pytest.raises(ValueError, match="out of range"):
        fast.step(torch.tensor([0, 256, 1]))


def test_attention_models_use_the_python_step():
    model = tiny(blocks=["mamba", "mamba", "attention"])
    assert "attention" in fast_unavailable_reason(model)
    wav = generate(model, 2, 100 / 16000, seed=0)  # falls back without complaint
    assert wav.shape == (2, 100)


def test_prefill_matches_teacher_forcing():
    model = tiny(n_classes=3)
    tokens = torch.randint(0, 256, (2, 37))
    with torch.no_grad():
        ref = model(tokens, label=1).logits[:, -1]
    logits, state = prefill(model, tokens, label=1)
    assert state.t == 37 and float((logits - ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("fast", [False, True])
def test_stream_is_the_models_distribution(fast):
    """Greedy decoding feeds back argmax tokens: the generated sequence must be the argmax of the parallel
    forward over [silence] + prompt + generated, at every step."""
    model = tiny()
    if fast:
        needs_fast(model)
    prompt = torch.randint(0, 256, (21,))
    new = torch.cat(list(stream(model, 40, batch=2, prompt=prompt, temperature=0.0, fast=fast, chunk=16)), 1)
    assert new.shape == (2, 40) and torch.equal(new[0], new[1])
    seq = torch.cat([torch.tensor([SILENCE_TOKEN]), prompt, new[0]])
    with torch.no_grad():
        logits = model(seq[None, :-1]).logits[0]
    assert torch.equal(logits[len(prompt):].argmax(-1), new[0])


def test_sampling_seeded_and_conditional():
    model = tiny(n_classes=10)
    a = generate(model, 2, 0.005, label=7, seed=3, top_p=0.9)
    b = generate(model, 2, 0.005, label=7, seed=3, top_p=0.9)
    assert a.shape == (2, 80) and torch.equal(a, b) and float(a.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="unconditional"):
        generate(tiny(), 1, 0.001, label=3)


def test_generate_cli_writes_wavs(tmp_path, capsys):
    from apps.audio.generate import main

    ckpt = tiny(n_classes=10).save_pretrained(tmp_path / "ckpt")
    prompt = write_audio(tmp_path / "prompt.wav", read_audio(sorted(SAMPLE.rglob("*.flac"))[0])[:800])
    paths = main(["--ckpt", str(ckpt), "--n", "3", "--seconds", "0.01", "--out", str(tmp_path / "out"),
                  "--digit", "seven", "--prompt", str(prompt), "--top-p", "0.95", "--threads", "1"])
    assert len(paths) == 3
    wav = read_audio(paths[0])
    assert len(wav) == 800 + 160
    # the prompt comes back µ-law quantised, then the continuation
    assert torch.equal(mu_law_encode(wav[:800]), mu_law_encode(read_audio(prompt)))
    assert "samples/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--ckpt", str(ckpt), "--digit", "eleven"])


def test_evaluate_cli(tmp_path, capsys):
    from apps.audio.evaluate import main

    ckpt = tiny(n_classes=10).save_pretrained(tmp_path / "ckpt")
    r = main(["--ckpt", str(ckpt), "--sc09", str(SAMPLE), "--split", "test", "--max-clips", "2",
              "--chunk-len", "4000", "--threads", "1"])
    assert r["clips"] == 2 and r["samples"] == 32000
    assert 0 < r["nats_per_sample"] < 7 and r["bits_per_sample"] == pytest.approx(r["nats_per_sample"] / 0.693147, 1e-4)
    one = main(["--ckpt", str(ckpt), "--data", str(sorted(SAMPLE.rglob("*.flac"))[0]), "--threads", "1"])
    assert one["clips"] == 1
    assert "nats/sample" in capsys.readouterr().out


def test_shipped_checkpoint_loads_and_generates():
    assert (DEFAULT_CKPT / "config.json").is_file(), "the small trained model ships in apps/audio/assets"
    model = AudioUNet.from_pretrained(DEFAULT_CKPT).eval()
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (DEFAULT_CKPT / "model.safetensors").stat().st_size < 4_000_000
    wav = generate(model, 1, 0.01, label=3 if model.cond is not None else None, seed=0)
    assert wav.shape == (1, 160)


def test_demo_handlers(tmp_path):
    pytest.importorskip("gradio")
    from apps.audio.demo import ANY, AudioDemo, build_demo
    from apps.common.demo import gr

    ckpt = tiny(n_classes=10).save_pretrained(tmp_path / "ckpt")
    app = AudioDemo(ckpt)
    path, fig, status = app.generate("seven", 0.01, 1.0, 0.0, 0)
    assert Path(path).is_file() and len(read_audio(path)) == 160 and "samples/s" in status
    assert fig is not None
    clip = sorted(SAMPLE.rglob("*.flac"))[0]
    path, _, _ = app.continue_clip(str(clip), 0.01, ANY)
    assert len(read_audio(path)) == 16000 + 160
    (tmp_path / "bad.wav").write_bytes(b"RIFFjunk")
    with pytest.raises(gr.Error, match="bad.wav"):
        app.continue_clip(str(tmp_path / "bad.wav"), 0.1)
    write_audio(tmp_path / "quiet.wav", torch.zeros(1600))
    with pytest.raises(gr.Error, match="silent"):
        app.continue_clip(str(tmp_path / "quiet.wav"), 0.1)
    with pytest.raises(gr.Error, match="between 0 and"):
        app.generate(ANY, 60.0)
    assert isinstance(build_demo(ckpt), gr.Blocks)
    missing = build_demo(tmp_path / "nothing_here")
    assert isinstance(missing, gr.Blocks)  # a page that says how to train one
