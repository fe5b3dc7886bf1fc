"""Data recipes for apps/audio that run offline: SC09-like spoken digits synthesised with espeak-ng.

    python datasets/recipes/audio.py digits [--root DIR] [--per-voice 3]   # the CLI (also codec2 / czech speech)

``ensure_digits(root)`` is what ``AudioDataModule(source="digits")`` calls on first use: it writes the ten
words "zero" .. "nine", 1 s at 16 kHz, in the Speech Commands layout (``root/<word>/<voice>_nohash_<k>.wav``,
``validation_list.txt``, ``testing_list.txt``), cached: a complete set is only checked. Voices are an
espeak-ng accent (en-us, en-gb, ...) with a voice variant (m1, f3, klatt2, ...); every clip draws its speed
(140-200 words/min, so each word fits in 1 s) and pitch (20-80) at random (seeded). The split is by
*variant*: the valid and test variants are never heard in training under any accent, so test voices are
unseen. Each word is trimmed of leading/trailing silence, peak-normalised to -1 dBFS and placed at a random
offset inside the second; the rest is digital silence.

Needs the ``espeak-ng`` program (Debian/Ubuntu: ``apt-get install espeak-ng``); without it a clear error says
so and how to train on other audio instead. The tests use the small bundled sample instead
(``datasets/samples/digits_small``).
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import soundfile as sf
import torch
import torchaudio.functional as AF

from apps.audio.data import DIGITS, SAMPLE_RATE, AudioError, write_audio
from apps.common.errors import UserError

__all__ = ["ACCENTS", "VARIANTS", "TEST_VARIANTS", "VALID_VARIANTS", "ensure_digits", "synthesize_word",
           "espeak_available", "ESPEAK_MISSING", "EspeakMissing"]

log = logging.getLogger(__name__)

ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-us-nyc")
# espeak-ng voice variants (files under espeak-ng-data/voices/!v); "norbert" is unintelligible, whispers and
# robots are left out
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5", "klatt", "klatt2",
            "klatt3", "croak", "adam", "aunty", "boris", "caleb", "david", "ed", "edward", "iven", "john", "linda",
            "max", "paul", "pedro", "quincy", "rob", "robert", "steph", "travis", "victor", "zac", "grandma",
            "grandpa")
VALID_VARIANTS = ("f2", "iven", "victor")
TEST_VARIANTS = ("m3", "f4", "klatt3", "linda", "paul")
SPEED = (140, 200)
PITCH = (20, 80)
PEAK = 10 ** (-1 / 20)  # -1 dBFS
FORMAT_VERSION = 1

ESPEAK_MISSING = ("the spoken-digits recipe needs the espeak-ng program, which is not installed. Install it "
                  "(Debian/Ubuntu: `sudo apt-get install espeak-ng`), or train on audio you have: "
                  "`--data.source sc09 --data.root DIR` (a Speech Commands / SC09 folder) or "
                  "`--data.source folder --data.paths '[DIR]'` (any folder of WAV/FLAC/OGG/MP3).")


class EspeakMissing(UserError, RuntimeError):
    """The espeak-ng program is not installed (the message says what to do instead)."""


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def synthesize_word(word: str, voice: str, speed: int, pitch: int, seed: int,
                    sample_rate: int = SAMPLE_RATE, length: int = SAMPLE_RATE) -> torch.Tensor:
    """One spoken word as a (length,) float waveform: espeak-ng -> resample (torchaudio) -> trim silence ->
    peak -1 dBFS -> placed at a random offset (``seed``). Raises AudioError if the word does not fit."""
    if not espeak_available():
        raise EspeakMissing(ESPEAK_MISSING)
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
                          capture_output=True, check=False, timeout=60)
    if proc.returncode != 0 or not proc.stdout:
        raise AudioError(f"espeak-ng -v {voice} {word!r} failed: {proc.stderr.decode(errors='replace').strip()}")
    data, rate = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    wav = torch.from_numpy(data).mean(1)
    if rate != sample_rate:
        wav = AF.resample(wav, rate, sample_rate)
    loud = (wav.abs() > 0.01 * wav.abs().max()).nonzero()
    if len(loud) == 0:
        raise AudioError(f"espeak-ng -v {voice} {word!r}: silence only")
    wav = wav[int(loud[0]) : int(loud[-1]) + 1]
    wav = wav / wav.abs().max() * PEAK
    if len(wav) > length:
        raise AudioError(f"espeak-ng -v {voice} -s {speed} {word!r}: {len(wav) / sample_rate:.2f} s does not fit "
                         f"in {length / sample_rate:.2f} s")
    out = torch.zeros(length)
    start = random.Random(seed).randint(0, length - len(wav))
    out[start : start + len(wav)] = wav
    return out


def _available_variants() -> set[str] | None:
    try:
        listing = subprocess.run(["espeak-ng", "--voices=variant"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {line.split()[4].split("/")[-1] for line in listing.splitlines()[1:] if len(line.split()) >= 5}


def _split_of(variant: str) -> str:
    return "test" if variant in TEST_VARIANTS else "valid" if variant in VALID_VARIANTS else "train"


def ensure_digits(root: str | Path, per_voice: int = 1, seed: int = 0, progress: bool = True,
                  workers: int = 4) -> Path:
    """The spoken-digits set at ``root`` (generated if absent or made with other settings); returns root.

    ``per_voice`` renditions of each digit per voice (accent x variant): 312 voices, so 3,120 clips per
    rendition (about 40 s on two cores the first time; 100 MB of 16-bit WAV per rendition)."""
    root = Path(root)
    manifest = root / "manifest.json"
    want = {"format": FORMAT_VERSION, "per_voice": per_voice, "seed": seed, "sample_rate": SAMPLE_RATE,
            "accents": list(ACCENTS), "variants": list(VARIANTS)}
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        if {k: have.get(k) for k in want} == want:
            return root
        log.warning("%s: made with other settings (%s); regenerating", root,
                    {k: have.get(k) for k in want if have.get(k) != want[k]})
    if not espeak_available():
        raise EspeakMissing(ESPEAK_MISSING)
    from tqdm.auto import tqdm

    present = _available_variants()
    variants = [v for v in VARIANTS if present is None or v in present]
    missing = sorted(set(VARIANTS) - set(variants))
    if missing:
        log.warning("espeak-ng lacks the voice variants %s; generating without them", missing)
    jobs = []
    for accent in ACCENTS:
        for variant in variants:
            for word in DIGITS:
                for k in range(per_voice):
                    rng = random.Random(f"{seed}/{accent}/{variant}/{word}/{k}")
                    jobs.append((word, accent, variant, k, rng.randint(*SPEED), rng.randint(*PITCH),
                                 rng.randrange(1 << 30)))
    tmp = root.with_name(root.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    def make(job):
        word, accent, variant, k, speed, pitch, s = job
        name = f"{word}/{accent}-{variant}_nohash_{k}.wav"
        for attempt in range(4):  # too long at this speed: speak faster
            try:
                wav = synthesize_word(word, f"{accent}+{variant}", speed + 15 * attempt, pitch, s)
                break
            except AudioError:
                if attempt == 3:
                    raise
        write_audio(tmp / name, wav)
        return name, {"voice": f"{accent}+{variant}", "speed": speed, "pitch": pitch, "split": _split_of(variant)}

    for word in DIGITS:
        (tmp / word).mkdir()
    clips = {}
    with ThreadPoolExecutor(workers) as pool:
        for name, meta in tqdm(pool.map(make, jobs), total=len(jobs), desc=f"espeak-ng digits -> {root}",
                               disable=not progress):
            clips[name] = meta
    for split, fname in (("valid", "validation_list.txt"), ("test", "testing_list.txt")):
        (tmp / fname).write_text("".join(f"{n}\n" for n, m in sorted(clips.items()) if m["split"] == split))
    (tmp / "manifest.json").write_text(json.dumps({**want, "n_clips": len(clips), "clips": clips}, indent=1))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    log.info("spoken digits: %d clips in %s", len(clips), root)
    return root
