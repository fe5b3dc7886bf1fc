"""apps/audio data: soundfile I/O, torchaudio resampling and µ-law, mix-down, bad files named in errors or
logged skips, the Speech Commands layout (bundled sample), folder splits, clip and window datasets, recipe."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from apps.audio.data import (
    DIGITS,
    SILENCE_TOKEN,
    AudioDataModule,
    AudioError,
    Clip,
    ClipDataset,
    WindowDataset,
    folder_splits,
    is_silent,
    list_audio,
    load_tokens,
    mu_law_decode,
    mu_law_encode,
    read_audio,
    speaker_of,
    speech_commands_splits,
    write_audio,
)
from apps.audio.recipes import ESPEAK_MISSING, espeak_available, synthesize_word

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLE = Path(__file__).resolve().parents[3] / "datasets" / "samples" / "digits_small"


def tone(seconds: float = 0.25, rate: int = 16000, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.mark.parametrize("suffix", [".wav", ".flac", ".ogg", ".mp3"])
def test_formats_roundtrip(tmp_path, suffix):
    x = tone()
    path = write_audio(tmp_path / f"a{suffix}", torch.from_numpy(x))
    y = read_audio(path)
    assert y.dtype == torch.float32 and y.dim() == 1
    if suffix in (".wav", ".flac"):  # lossless: equal to 16-bit precision
        assert len(y) == len(x) and float((y - torch.from_numpy(x)).abs().max()) < 1e-4
    else:  # lossy codecs: same length within the codec's padding, same loudness
        assert abs(len(y) - len(x)) < 2000 and abs(float(y.abs().max()) - 0.5) < 0.1


def test_resample_and_mixdown(tmp_path):
    left, right = tone(0.5, 44100, 300.0, 0.6), tone(0.5, 44100, 300.0, 0.2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 44100, subtype="FLOAT")
    y, rate = read_audio(tmp_path / "st.wav", return_rate=True)
    assert rate == 16000 and len(y) == 8000
    expect = AF.resample(torch.from_numpy((left + right) / 2), 44100, 16000)  # mean of channels, torchaudio
    assert torch.allclose(y, expect.clamp(-1, 1), atol=1e-6)
    native = read_audio(tmp_path / "st.wav", sample_rate=None)
    assert len(native) == len(left)


def test_mu_law_is_torchaudio():
    x = torch.linspace(-1, 1, 1001)
    tok = mu_law_encode(x)
    assert tok.min() == 0 and tok.max() == 255
    assert torch.equal(tok, AF.mu_law_encoding(x, 256))
    assert torch.allclose(mu_law_decode(tok), AF.mu_law_decoding(tok, 256))
    assert SILENCE_TOKEN == 128 and float(mu_law_decode(torch.tensor([SILENCE_TOKEN]))) == pytest.approx(0, abs=1e-2)
    # 8-bit µ-law: small amplitudes are resolved finely
    assert float((mu_law_decode(mu_law_encode(x)) - x).abs()[x.abs() < 0.01].max()) < 1e-3


def test_bad_files_are_named(tmp_path):
    good = write_audio(tmp_path / "good.wav", torch.from_numpy(tone()))
    data = good.read_bytes()
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "trunc.wav").write_bytes(data[: len(data) // 2])
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(range(256)) * 8)
    (tmp_path / "notes.mp3").write_text("this is not audio at all" * 20)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav")
    for name, why in [("empty.wav", "empty"), ("trunc.wav", "truncated"), ("corrupt.wav", "cannot decode"),
                      ("notes.mp3", "cannot decode")]:
        with pytest.raises(AudioError, match=rf"{name}.*{why}"):
            read_audio(tmp_path / name)
    with pytest.raises(AudioError, match="unknown audio format"):
        write_audio(tmp_path / "x.xyz", torch.zeros(10))


def test_datasets_skip_bad_and_silent_files_with_a_logged_warning(tmp_path, caplog):
    write_audio(tmp_path / "good.wav", torch.from_numpy(tone()))
    write_audio(tmp_path / "silent.wav", torch.zeros(4000))
    (tmp_path / "broken.flac").write_bytes(b"fLaC" + bytes(100))
    clips = [Clip(p) for p in list_audio(tmp_path)]
    assert len(clips) == 3
    with caplog.at_level(logging.WARNING):
        ds = ClipDataset(clips, clip_len=4096)
    assert len(ds) == 1 and ds.items[0][0].path.name == "good.wav"
    assert "broken.flac" in caplog.text and "silent.wav" in caplog.text and "silence only" in caplog.text
    assert is_silent(torch.zeros(5)) and not is_silent(torch.from_numpy(tone()))
    with pytest.raises(AudioError, match="no usable audio"):
        load_tokens([Clip(tmp_path / "silent.wav")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(AudioError, match="no audio files"):
        list_audio(tmp_path / "empty_dir")


def test_clip_items_pad_crop_and_shift(tmp_path):
    write_audio(tmp_path / "short.wav", torch.from_numpy(tone(0.1)))  # 1600 samples
    ds = ClipDataset([Clip(tmp_path / "short.wav", label=7)], clip_len=2048)
    item = ds[0]
    assert item["input_ids"].shape == (2048,) and int(item["label"]) == 7
    assert int(item["input_ids"][0]) == SILENCE_TOKEN  # input = [silence] + tokens[:-1]
    assert torch.equal(item["input_ids"][1:1600], item["labels"][:1599])
    assert (item["labels"][1600:] == -100).all() and (item["labels"][:1600] >= 0).all()  # padding not scored
    crop = ClipDataset([Clip(tmp_path / "short.wav")], clip_len=2048, random_crop=True, crop_len=512)[0]
    assert crop["input_ids"].shape == (512,)


def test_window_dataset(tmp_path):
    for i in range(2):
        write_audio(tmp_path / f"{i}.wav", torch.from_numpy(tone(0.2, freq=200 + 100 * i)))
    clips = [Clip(p) for p in list_audio(tmp_path)]
    ds = WindowDataset(clips, seq_len=1024)
    assert len(ds) == 6400 // 1024 and ds[1]["input_ids"].shape == (1024,)
    assert torch.equal(ds[1]["labels"], ds.stream[1024:2048].long())
    assert len(WindowDataset(clips, 1024, samples_per_epoch=5)) == 5
    with pytest.raises(AudioError, match="fewer than one window"):
        WindowDataset(clips, seq_len=1 << 20)


def test_speech_commands_layout_bundled_sample():
    splits = speech_commands_splits(SAMPLE)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "valid": 10, "test": 10}
    speakers = {k: {speaker_of(c.path) for c in v} for k, v in splits.items()}
    assert speakers["train"].isdisjoint(speakers["test"]) and speakers["valid"].isdisjoint(speakers["test"])
    assert sorted(c.label for c in splits["test"]) == list(range(10))
    assert all(c.path.parent.name == DIGITS[c.label] for c in splits["train"])
    wav = read_audio(splits["train"][0].path)
    assert len(wav) == 16000 and not is_silent(wav)


def test_speech_commands_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        speech_commands_splits(tmp_path / "nowhere")
    shutil.copytree(SAMPLE, tmp_path / "sc", dirs_exist_ok=True)
    (tmp_path / "sc" / "testing_list.txt").unlink()
    with pytest.raises(FileNotFoundError, match="testing_list.txt"):
        speech_commands_splits(tmp_path / "sc")


def test_folder_splits_stable(tmp_path):
    for i in range(40):
        write_audio(tmp_path / f"f{i:02d}.wav", torch.from_numpy(tone(0.01)))
    a = folder_splits(tmp_path, 0.1, 0.1)
    assert sum(map(len, a.values())) == 40 and a["valid"] and a["test"]
    write_audio(tmp_path / "new.wav", torch.from_numpy(tone(0.01)))
    b = folder_splits(tmp_path, 0.1, 0.1)
    assert set(a["test"]) <= set(b["test"])  # adding a file does not move the others


def test_datamodule_sc09_sample():
    dm = AudioDataModule(source="sc09", root=str(SAMPLE), clip_len=16000, train_crop=1024, batch_size=4,
                         progress=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (4, 1024) and batch["label"].shape == (4,)
    val = next(iter(dm.val_dataloader()))
    assert val["input_ids"].shape[1] == 16000
    with pytest.raises(ValueError, match="exactly one of clip_len"):
        AudioDataModule(source="sc09", root=str(SAMPLE), clip_len=None)


def test_digits_recipe_without_espeak(monkeypatch, tmp_path):
    monkeypatch.setattr("apps.audio.recipes.shutil.which", lambda name: None)
    assert not espeak_available()
    dm = AudioDataModule(source="digits", root=str(tmp_path / "digits"), progress=False)
    with pytest.raises(RuntimeError, match="espeak-ng") as e:
        dm.prepare_data()
    assert "apt-get install espeak-ng" in str(e.value) and str(e.value) == ESPEAK_MISSING


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_synthesize_word_fits_one_second():
    wav = synthesize_word("seven", "en-us+f3", 170, 50, seed=1)
    assert wav.shape == (16000,) and abs(float(wav.abs().max()) - 10 ** (-1 / 20)) < 1e-3
    assert int((wav != 0).sum()) > 3000  # a word, not a click
