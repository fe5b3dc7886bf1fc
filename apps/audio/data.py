"""Audio data for the waveform models: files -> 16 kHz mono -> 8-bit µ-law tokens -> clip / window datasets.

Reading and writing go through ``soundfile`` (libsndfile ships inside its wheel: WAV, FLAC, OGG/Vorbis,
MP3, AIFF; nothing to apt-get). torchaudio 2.11's own ``load``/``save`` need TorchCodec plus system FFmpeg
libraries, so they are not used; resampling (``torchaudio.functional.resample``) and the µ-law codec
(``torchaudio.functional.mu_law_encoding`` / ``mu_law_decoding``, 256 classes) are torchaudio's.

Multichannel files are mixed down to mono by averaging the channels (equal weights, no renormalisation:
a stereo file whose channels cancel becomes quiet, which is what a listener of the mono mix hears).

Bad input is never silent: a missing, empty, truncated, corrupt or unknown-format file raises
``AudioError`` naming the file and the reason. Datasets read (and validate) every file when they are
built; a bad file or a silence-only clip is then *skipped with a logged warning naming it*, so nothing
fails mid-epoch; a dataset left with no usable file is an error.

Layouts:
- SC09 / Speech Commands: ``root/<word>/<speaker>_nohash_<n>.wav`` with ``validation_list.txt`` and
  ``testing_list.txt`` (paths relative to root); SC09 keeps the ten digit words. The digits recipe
  (``apps.audio.recipes``) writes the same layout, split by voice.
- Any folder: every audio file under it, split into train/valid/test by a hash of its relative path
  (stable when files are added).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ssm_core import atomic_write

__all__ = [
    "SAMPLE_RATE", "N_CLASSES", "SILENCE_TOKEN", "DIGITS", "AUDIO_EXTENSIONS", "AudioError",
    "read_audio", "write_audio", "mu_law_encode", "mu_law_decode", "is_silent", "list_audio",
    "speech_commands_splits", "folder_splits", "Clip", "ClipDataset", "WindowDataset", "AudioDataModule",
    "default_data_root",
]

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
N_CLASSES = 256  # 8-bit µ-law
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au")
SILENCE_PEAK = 1e-3  # a clip whose peak |amplitude| is below this (about -60 dBFS) is silence-only


class AudioError(ValueError):
    """A file that cannot be used as audio; the message names the file and says why."""


def _tokens_of(x: Tensor) -> Tensor:
    return AF.mu_law_encoding(x, N_CLASSES)


SILENCE_TOKEN = int(_tokens_of(torch.zeros(1))[0])  # µ-law code of 0.0 (128)


def default_data_root() -> Path:
    """Where generated data sets are cached: $HISS_AUDIO_DATA, else ~/.cache/hiss/audio."""
    env = os.environ.get("HISS_AUDIO_DATA")
    return Path(env) if env else Path.home() / ".cache" / "hiss" / "audio"


def _check_truncated(path: Path, f: sf.SoundFile) -> None:
    # libsndfile reads a truncated WAV/AIFF up to where the bytes stop and notes it in its header log
    # ("data : 32000 (should be 19956)"); we refuse such files rather than train on half a clip.
    m = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", f.extra_info, re.MULTILINE)
    if m and int(m.group(2)) < int(m.group(1)):
        raise AudioError(f"{path}: truncated file (its header declares {int(m.group(1)):,} data bytes, "
                         f"only {int(m.group(2)):,} are present)")


def read_audio(path: str | os.PathLike, sample_rate: int | None = SAMPLE_RATE, return_rate: bool = False):
    """Read an audio file as mono float32 in [-1, 1], resampled to ``sample_rate`` (None: keep the file's).

    Returns a (L,) tensor (and the rate if ``return_rate``). Channels are averaged (see module doc).
    Raises FileNotFoundError for a missing path and AudioError for an empty, truncated, corrupt or
    unsupported file, or one with no frames.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        with sf.SoundFile(str(path)) as f:
            _check_truncated(path, f)
            rate = f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        raise AudioError(f"{path}: cannot decode ({e.error_string if hasattr(e, 'error_string') else e}); "
                         f"readable formats: {', '.join(AUDIO_EXTENSIONS)}") from e
    except (RuntimeError, TypeError) as e:  # soundfile raises these for unknown / broken containers
        raise AudioError(f"{path}: cannot decode ({e})") from e
    if data.shape[0] == 0:
        raise AudioError(f"{path}: no audio frames")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: contains NaN or infinite samples")
    wav = torch.from_numpy(data).mean(dim=1)  # (L,): equal-weight mix-down
    if sample_rate is not None and rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
        rate = sample_rate
    wav = wav.clamp(-1.0, 1.0)
    return (wav, rate) if return_rate else wav


_SUBTYPES = {".wav": "PCM_16", ".flac": "PCM_16", ".ogg": "VORBIS", ".oga": "VORBIS", ".mp3": "MPEG_LAYER_III",
             ".aiff": "PCM_16", ".aif": "PCM_16", ".au": "PCM_16"}


def write_audio(path: str | os.PathLike, wav: Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """Write mono (L,) or (channels, L) audio in [-1, 1] atomically; the format follows the suffix
    (16-bit PCM for WAV/FLAC/AIFF). A crash mid-write leaves no half file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _SUBTYPES:
        raise AudioError(f"{path}: unknown audio format {suffix!r}; use one of {', '.join(_SUBTYPES)}")
    data = wav.detach().cpu().float().numpy() if isinstance(wav, Tensor) else np.asarray(wav, dtype=np.float32)
    if data.ndim == 2:
        data = data.T  # soundfile wants (frames, channels)
    data = np.clip(data, -1.0, 1.0)
    fmt = {".oga": "OGG", ".aif": "AIFF", ".mp3": "MP3"}.get(suffix, suffix[1:].upper())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: sf.write(tmp, data, sample_rate, subtype=_SUBTYPES[suffix], format=fmt))
    return path


def mu_law_encode(wav: Tensor) -> Tensor:
    """float waveform in [-1, 1] -> int64 tokens 0..255 (torchaudio's 8-bit µ-law)."""
    return _tokens_of(wav.clamp(-1.0, 1.0).float())


def mu_law_decode(tokens: Tensor) -> Tensor:
    """tokens 0..255 -> float32 waveform in [-1, 1] (torchaudio's µ-law decoding)."""
    return AF.mu_law_decoding(tokens.long(), N_CLASSES).float()


def is_silent(wav: Tensor, threshold: float = SILENCE_PEAK) -> bool:
    """Whether a clip holds nothing audible (peak below ``threshold``, about -60 dBFS by default)."""
    return wav.numel() == 0 or float(wav.abs().max()) < threshold


def list_audio(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Audio files among ``paths`` (files, or folders searched recursively), sorted; a path that does not
    exist is a FileNotFoundError, a folder with no audio an AudioError."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise AudioError(f"{p}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return out


@dataclass(frozen=True)
class Clip:
    path: Path
    label: int = -1  # digit 0-9, or -1 for unlabelled audio


def speech_commands_splits(root: str | os.PathLike, words: Sequence[str] = DIGITS) -> dict[str, list[Clip]]:
    """SC09 / Speech Commands layout -> {"train", "valid", "test"} lists of labelled clips.

    ``validation_list.txt`` / ``testing_list.txt`` (relative paths, one a line) pick the held-out clips;
    every other clip of a kept word is training data. Labels are indices into ``words`` (SC09: the digits).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the Speech Commands / SC09 layout "
                                "root/<word>/<speaker>_nohash_<n>.wav)")
    held: dict[str, set[str]] = {}
    for split, name in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        f = root / name
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; the Speech Commands layout lists its {split} clips there")
        held[split] = {line.strip() for line in f.read_text().splitlines() if line.strip()}
    out: dict[str, list[Clip]] = {"train": [], "valid": [], "test": []}
    for label, word in enumerate(words):
        folder = root / word
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: missing word folder in the Speech Commands layout")
        for f in sorted(folder.iterdir()):
            if f.suffix.lower() not in AUDIO_EXTENSIONS:
                continue
            rel = f"{word}/{f.name}"
            split = "valid" if rel in held["valid"] else "test" if rel in held["test"] else "train"
            out[split].append(Clip(f, label))
    if not out["train"]:
        raise AudioError(f"{root}: no training clips for the words {list(words)}")
    return out


def speaker_of(path: str | os.PathLike) -> str:
    """Speech Commands speaker id: the file name before ``_nohash_``."""
    return Path(path).name.split("_nohash_")[0]


def _hash_fraction(key: str) -> float:
    return int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def folder_splits(paths, valid_frac: float = 0.05, test_frac: float = 0.05) -> dict[str, list[Clip]]:
    """Any files / folders -> {"train", "valid", "test"} by a hash of each file's name relative to its folder
    (so a file keeps its split when others are added). With fewer than 3 files, all of them are used for
    every split (and a warning says so)."""
    files = list_audio(paths)
    roots = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]

    def key(f: Path) -> str:
        for r in roots:
            if r.is_dir() and f.is_relative_to(r):
                return str(f.relative_to(r))
        return f.name

    if len(files) < 3:
        log.warning("only %d audio file(s): train, valid and test all use %s", len(files),
                    ", ".join(map(str, files)))
        clips = [Clip(f) for f in files]
        return {"train": clips, "valid": clips, "test": clips}
    out: dict[str, list[Clip]] = {"train": [], "valid": [], "test": []}
    for f in files:
        h = _hash_fraction(key(f))
        split = "test" if h < test_frac else "valid" if h < test_frac + valid_frac else "train"
        out[split].append(Clip(f))
    for split in ("valid", "test"):  # tiny folders: make sure every split has something
        if not out[split] and len(out["train"]) > 1:
            out[split].append(out["train"].pop())
    return out


def load_tokens(clips: Sequence[Clip], sample_rate: int = SAMPLE_RATE, progress: bool = False,
                what: str = "clips", skip_silent: bool = True) -> list[tuple[Clip, Tensor]]:
    """Read and µ-law-encode every clip (uint8 tokens, (L,)); bad or silence-only files are skipped with a
    logged warning naming them. Raises AudioError if nothing usable is left."""
    from tqdm.auto import tqdm

    out, skipped = [], []
    for clip in tqdm(clips, desc=f"reading {what}", disable=not progress, leave=False):
        try:
            wav = read_audio(clip.path, sample_rate)
        except (AudioError, FileNotFoundError) as e:
            log.warning("skipping %s", e)
            skipped.append(str(clip.path))
            continue
        if skip_silent and is_silent(wav):
            log.warning("skipping %s: silence only (peak below %.0e)", clip.path, SILENCE_PEAK)
            skipped.append(str(clip.path))
            continue
        out.append((clip, mu_law_encode(wav).to(torch.uint8)))
    if not out:
        raise AudioError(f"no usable audio among {len(clips)} {what} (skipped: {', '.join(skipped[:5])}"
                         f"{' ...' if len(skipped) > 5 else ''})")
    return out


def lm_item(tokens: Tensor, n_real: int | None = None, label: int = -1) -> dict[str, Tensor]:
    """A clip of tokens (L,) -> model input and targets: input = [silence] + tokens[:-1], labels = tokens
    (every sample is predicted from the ones before it). Positions at or after ``n_real`` are padding:
    their labels are -100 (not scored)."""
    tokens = tokens.long()
    inp = torch.cat([tokens.new_full((1,), SILENCE_TOKEN), tokens[:-1]])
    labels = tokens.clone()
    if n_real is not None and n_real < len(tokens):
        labels[n_real:] = -100
    return {"input_ids": inp, "labels": labels, "label": torch.tensor(label)}


class ClipDataset(Dataset):
    """Fixed-length clips (SC09 style): each file is one example, cut or padded (with µ-law silence, not
    scored) to ``clip_len`` samples. Files are read and validated once, when the dataset is built."""

    def __init__(self, clips: Sequence[Clip], clip_len: int = SAMPLE_RATE, sample_rate: int = SAMPLE_RATE,
                 progress: bool = False, what: str = "clips", random_crop: bool = False, crop_len: int | None = None):
        self.clip_len, self.random_crop, self.crop_len = clip_len, random_crop, crop_len
        self.items = load_tokens(clips, sample_rate, progress, what)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        clip, tokens = self.items[i]
        n = len(tokens)
        if n > self.clip_len:
            start = int(torch.randint(0, n - self.clip_len + 1, ())) if self.random_crop else 0
            tokens, n = tokens[start : start + self.clip_len], self.clip_len
        elif n < self.clip_len:
            tokens = torch.cat([tokens, tokens.new_full((self.clip_len - n,), SILENCE_TOKEN)])
        if self.crop_len and self.crop_len < self.clip_len:  # a random window of the (padded) clip
            start = int(torch.randint(0, self.clip_len - self.crop_len + 1, ()))
            tokens, n = tokens[start : start + self.crop_len], min(max(n - start, 0), self.crop_len)
        return lm_item(tokens, n, clip.label)


class WindowDataset(Dataset):
    """Long-audio training (YouTubeMix style): the files' tokens joined into one stream (in file order) and
    cut into ``seq_len`` windows — random windows for training (``samples_per_epoch`` of them, a new draw
    each epoch), consecutive non-overlapping windows otherwise."""

    def __init__(self, clips: Sequence[Clip], seq_len: int, sample_rate: int = SAMPLE_RATE,
                 samples_per_epoch: int | None = None, progress: bool = False, what: str = "files"):
        items = load_tokens(clips, sample_rate, progress, what)
        self.stream = torch.cat([t for _, t in items])
        self.seq_len, self.samples_per_epoch = seq_len, samples_per_epoch
        if len(self.stream) < seq_len:
            raise AudioError(f"{len(self.stream):,} samples of audio in {len(items)} {what}: fewer than one "
                             f"window of seq_len={seq_len:,}; use shorter windows or more audio")

    def __len__(self) -> int:
        if self.samples_per_epoch:
            return self.samples_per_epoch
        return len(self.stream) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        if self.samples_per_epoch:
            start = int(torch.randint(0, len(self.stream) - self.seq_len + 1, ()))
        else:
            start = i * self.seq_len
        return lm_item(self.stream[start : start + self.seq_len])


class AudioDataModule(pl.LightningDataModule):
    """Audio for training and evaluation.

    source: ``digits`` (the espeak-ng spoken-digits recipe, generated into ``root`` on first use),
    ``sc09`` (a Speech Commands / SC09 folder at ``root``) or ``folder`` (every audio file under ``paths``,
    hash split). ``clip_len``: fixed-length clips (SC09: 16,000 = 1 s); ``seq_len`` instead: windows of the
    joined stream (long context). ``train_crop``: train on random windows of this many samples of each clip
    (cheaper steps; evaluation always reads whole clips). ``max_valid``: validate on at most this many clips.
    ``n_voices`` / ``per_voice``: size of the generated digits set.
    """

    def __init__(self, source: str = "digits", root: str | None = None, paths: list[str] | None = None,
                 sample_rate: int = SAMPLE_RATE, clip_len: int | None = SAMPLE_RATE, seq_len: int | None = None,
                 batch_size: int = 8, eval_batch_size: int | None = None, samples_per_epoch: int | None = None,
                 num_workers: int = 0, valid_frac: float = 0.05, test_frac: float = 0.05,
                 max_valid: int | None = 64, per_voice: int = 1, train_crop: int | None = None,
                 progress: bool = True):
        super().__init__()
        if source not in ("digits", "sc09", "folder"):
            raise ValueError(f"AudioDataModule: source must be 'digits', 'sc09' or 'folder', got {source!r}")
        if (clip_len is None) == (seq_len is None):
            raise ValueError("AudioDataModule: give exactly one of clip_len (fixed clips) and seq_len (windows)")
        if source == "folder" and not paths:
            raise ValueError("AudioDataModule: source='folder' needs paths (files or folders of audio)")
        self.save_hyperparameters()
        self._splits: dict[str, list[Clip]] | None = None
        self._datasets: dict[str, Dataset] = {}

    @property
    def labelled(self) -> bool:
        return self.hparams.source in ("digits", "sc09")

    def data_root(self) -> Path:
        hp = self.hparams
        if hp.root:
            return Path(hp.root).expanduser()
        if hp.source == "digits":
            return default_data_root() / "digits"
        raise ValueError("AudioDataModule: source='sc09' needs root (the folder holding zero/ ... nine/)")

    def prepare_data(self) -> None:
        if self.hparams.source == "digits":
            from apps.audio.recipes import ensure_digits

            ensure_digits(self.data_root(), per_voice=self.hparams.per_voice, progress=self.hparams.progress)

    def splits(self) -> dict[str, list[Clip]]:
        if self._splits is None:
            hp = self.hparams
            if hp.source == "folder":
                paths = [Path(p).expanduser() for p in hp.paths]
                missing = [str(p) for p in paths if not p.exists()]
                if missing:
                    raise FileNotFoundError(f"no such file or folder: {', '.join(missing)} (audio recipes: python "
                                            "datasets/recipes/audio.py codec2|czech|gradio --out DIR)")
                self._splits = folder_splits(paths, hp.valid_frac, hp.test_frac)
            else:
                self._splits = speech_commands_splits(self.data_root())
        return self._splits

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            hp = self.hparams
            clips = self.splits()[split]
            if split == "valid" and hp.max_valid and len(clips) > hp.max_valid:
                # an evenly spaced subset: every class and voice still appears
                step = len(clips) / hp.max_valid
                clips = [clips[int(i * step)] for i in range(hp.max_valid)]
            if hp.clip_len:
                train = split == "train"
                ds = ClipDataset(clips, hp.clip_len, hp.sample_rate, hp.progress, f"{split} clips",
                                 random_crop=train, crop_len=hp.train_crop if train else None)
            else:
                ds = WindowDataset(clips, hp.seq_len, hp.sample_rate,
                                   hp.samples_per_epoch if split == "train" else None, hp.progress,
                                   f"{split} files")
            self._datasets[split] = ds
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if self.hparams.source == "digits":
            self.prepare_data()  # idempotent: a cached set is only checked
        self.dataset("train")
        self.dataset("valid")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        hp = self.hparams
        bs = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        return DataLoader(self.dataset(split), batch_size=bs, shuffle=shuffle, num_workers=hp.num_workers,
                          drop_last=split == "train" and len(self.dataset(split)) >= bs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=self.hparams.clip_len is not None)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def round_to_multiple(n: int, m: int) -> int:
    """The largest multiple of ``m`` that is <= n (at least m)."""
    return max(m, n // m * m) if m > 0 else n
