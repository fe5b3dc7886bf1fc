"""Generate audio with a waveform U-Net, one sample per step on the CPU, batched; WAV files out.

    python -m apps.audio.generate --n 16 --seconds 2 --out samples/                    # the shipped model
    python -m apps.audio.generate --ckpt DIR --n 4 --digit 7 --out sevens/             # ask for "seven"
    python -m apps.audio.generate --ckpt DIR --prompt clip.wav --seconds 1 --out cont/ # continue a clip
    python -m apps.audio.generate ... --temperature 0.9 --top-p 0.95 --seed 0

The prompt (any readable audio file, resampled to the model's rate) is read in one parallel pass up to the
last multiple of the total pooling, then stepped; every new sample is drawn from the model's 256-way µ-law
distribution and fed back. The recurrent step is exact (equal to the parallel forward, tests/apps/audio).
``fast=True`` (the default) runs steps *and* sampling in compiled code (apps.audio.fast) when the model allows
it: one call per chunk of ``chunk`` samples (1,600 = 0.1 s) for the whole batch, with its own per-row
generator (same distribution as the Python path, different draws for a seed; greedy is identical). Output files
hold the prompt followed by the continuation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from apps.audio.data import DIGITS, SILENCE_TOKEN, mu_law_decode, mu_law_encode, read_audio, write_audio
from apps.audio.evaluate import load_audio_model
from apps.audio.model import AudioUNet, UNetState
from apps.common.errors import run_cli
from ssm_core.models.generation import sample_logits

__all__ = ["DEFAULT_CKPT", "CHUNK", "prefill", "stream", "generate", "main"]

DEFAULT_CKPT = Path(__file__).parent / "assets" / "digits_small"


@torch.inference_mode()
def prefill(model: AudioUNet, tokens: Tensor, label=None) -> tuple[Tensor, UNetState]:
    """Read input tokens (B, L >= 1) -> (logits after the last one (B, vocab), state): a parallel pass over
    the longest prefix that is a multiple of the total pooling, steps for the rest."""
    B, L = tokens.shape
    P = model.config.total_pool
    m = (L - 1) // P * P  # keep at least one token to step: its logits are the ones returned
    state = model.empty_state(B)
    if m:
        state = model(tokens[:, :m], label=label, return_state=True).state
    cond = model.conditioning(label, B)
    logits = None
    for t in range(m, L):
        logits, state = model.step(tokens[:, t], state, cond=cond)
    return logits, state


CHUNK = 1600  # samples per compiled call and per progress report: 0.1 s at 16 kHz


def _compiled_stepper(model: AudioUNet, start: Tensor, label, seed: int | None, threads: int):
    """A FastStepper positioned after ``start`` (B, L >= 1): the longest prefix that is a multiple of the total
    pooling read in one parallel pass, the rest teacher-forced in C++. None when the model is not supported."""
    from apps.audio.fast import FastStepper, fast_supported

    if not fast_supported(model):
        return None
    B, L = start.shape
    m = (L - 1) // model.config.total_pool * model.config.total_pool
    state = model(start[:, :m], label=label, return_state=True).state if m else model.empty_state(B)
    stepper = FastStepper(model, state, label, threads=threads, seed=seed)
    stepper.feed(start[:, m:])
    return stepper


@torch.inference_mode()
def stream(model: AudioUNet, n_samples: int, batch: int = 1, label=None, prompt: Tensor | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, seed: int | None = None,
           fast: bool = True, chunk: int = CHUNK, threads: int = 1) -> Iterator[Tensor]:
    """Yield the new µ-law tokens in chunks (batch, <= chunk), n_samples in all. ``prompt``: µ-law tokens (P,)
    of audio to continue (shared by the batch); ``label``: a digit (or one per row, -1 = none) for a
    conditional model. ``fast``: compiled steps and sampling when the model allows it (``threads``: OpenMP
    threads over groups of rows), else the Python step with torch's sampler (the reference path)."""
    if n_samples < 0:
        raise ValueError(f"n_samples must be >= 0, got {n_samples}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    start = torch.full((batch, 1), SILENCE_TOKEN, dtype=torch.long)
    if prompt is not None and len(prompt):
        start = torch.cat([start, prompt.long().reshape(1, -1).expand(batch, -1)], 1)
    stepper = _compiled_stepper(model, start, label, seed, threads) if fast and n_samples else None
    if stepper is not None:
        done = 0
        while done < n_samples:
            k = min(chunk, n_samples - done)
            done += k
            yield stepper.sample(k, temperature, top_k, top_p, feed_last=done < n_samples)
        return
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    logits, state = prefill(model, start, label)
    cond = model.conditioning(label, batch)
    out = []
    for i in range(n_samples):
        token = sample_logits(logits.float(), temperature, top_k, top_p, gen)
        out.append(token)
        if len(out) == chunk or i + 1 == n_samples:
            yield torch.stack(out, 1)
            out = []
        if i + 1 < n_samples:
            logits, state = model.step(token, state, cond=cond)


def generate(model: AudioUNet, n: int = 1, seconds: float = 1.0, label=None, prompt: Tensor | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, seed: int | None = None,
             fast: bool = True, progress: Callable[[int, int], None] | None = None, threads: int = 1,
             chunk: int = CHUNK) -> Tensor:
    """(n, len(prompt) + seconds * rate) waveforms in [-1, 1]: the prompt (µ-law tokens) then the new audio.
    ``progress(done, total)`` is called after every chunk."""
    total = int(round(seconds * model.config.sample_rate))
    out, done = [], 0
    for piece in stream(model, total, n, label, prompt, temperature, top_k, top_p, seed, fast, chunk, threads):
        out.append(piece)
        done += piece.shape[1]
        if progress is not None:
            progress(done, total)
    new = torch.cat(out, 1) if out else torch.zeros(n, 0, dtype=torch.long)
    if prompt is not None and len(prompt):
        new = torch.cat([prompt.long().reshape(1, -1).expand(n, -1), new], 1)
    return mu_law_decode(new)


def parse_digit(value: str | None) -> int | None:
    if value is None:
        return None
    v = value.strip().lower()
    if v in DIGITS:
        return DIGITS.index(v)
    if v.isdigit() and 0 <= int(v) <= 9:
        return int(v)
    raise argparse.ArgumentTypeError(f"--digit takes 0-9 or a word zero..nine, got {value!r}")


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="exported model folder or .ckpt (default: shipped)")
    p.add_argument("--n", type=int, default=4, help="how many clips (generated as one batch)")
    p.add_argument("--seconds", type=float, default=1.0, help="new audio per clip")
    p.add_argument("--out", default="runs/audio/samples", help="output folder for the WAV files")
    p.add_argument("--prompt", help="an audio file to continue")
    p.add_argument("--digit", type=parse_digit, help="0-9 or zero..nine (conditional models)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slow", action="store_true", help="use the Python step instead of the compiled one")
    p.add_argument("--threads", type=int, default=1,
                   help="threads (torch's for the prompt; the compiled step's over groups of rows)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.n < 1 or a.seconds < 0:
        p.error("--n must be >= 1 and --seconds >= 0")
    model = load_audio_model(a.ckpt)
    if a.digit is not None and model.cond is None:
        p.error(f"{a.ckpt} is an unconditional model: it cannot be asked for a digit")
    prompt = mu_law_encode(read_audio(a.prompt, model.config.sample_rate)) if a.prompt else None
    from tqdm.auto import tqdm

    bar = tqdm(total=int(round(a.seconds * model.config.sample_rate)), unit="sample", desc=f"generating {a.n}")
    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    wav = generate(model, a.n, a.seconds, a.digit, prompt, a.temperature, a.top_k, a.top_p, a.seed,
                   fast=not a.slow, progress=progress, threads=a.threads)
    bar.close()
    dt = time.perf_counter() - t0
    out = Path(a.out)
    paths = [write_audio(out / f"sample_{i:03d}.wav", wav[i], model.config.sample_rate) for i in range(a.n)]
    new = int(round(a.seconds * model.config.sample_rate)) * a.n
    rate = new / dt if dt > 0 else float("inf")
    print(f"{a.n} clips -> {out}/ : {new:,} new samples in {dt:.1f} s = {rate:,.0f} samples/s "
          f"({rate / model.config.sample_rate:.2f}x real time, batch {a.n}"
          f"{', reading the prompt included' if prompt is not None else ''})")
    return paths


if __name__ == "__main__":
    run_cli(main)
