"""Exact negative log-likelihood of audio under a waveform U-Net, in nats/sample and bits/sample.

    python -m apps.audio.evaluate --ckpt apps/audio/assets/digits_small --data DIR_OR_FILES ...
    python -m apps.audio.evaluate --ckpt DIR --sc09 ~/.cache/hiss/audio/digits --split test [--max-clips 64]

Every file is read whole (16 kHz mono µ-law, see apps.audio.data); sample t is scored given samples < t, the
first one given silence (SC09's convention: every sample of a clip counts). Clips longer than ``--chunk-len``
are read in pieces with the U-Net's state carried across, so the number is exact for any length and memory is
one piece's. A conditional model is scored with each clip's digit label when it has one (``--unconditional``:
with none). Bad or silence-only files are skipped with a warning naming them.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from apps.audio.data import Clip, list_audio, lm_item, load_tokens, speech_commands_splits
from apps.audio.model import AudioUNet
from apps.common.callbacks import HeldOutEvaluation
from apps.common.checkpoint import load_model
from apps.common.errors import run_cli

__all__ = ["clips_nll", "evaluate_clips", "load_audio_model", "HeldOutNLL", "main"]

LN2 = math.log(2)


def load_audio_model(ckpt: str | Path) -> AudioUNet:
    """An exported U-Net folder (config.json + model.safetensors) or a Lightning .ckpt of AudioLM, eval mode."""
    from apps.audio.model import AudioLM

    return load_model(ckpt, model_class=AudioUNet, lightning_module=AudioLM, what="audio model")


@torch.no_grad()
def clips_nll(model: AudioUNet, items: Sequence[tuple[Clip, Tensor]], batch_size: int = 8,
              chunk_len: int = 16_000, use_labels: bool = True, progress: bool = False) -> tuple[float, int]:
    """Summed nats and number of scored samples over whole clips (``items``: (Clip, uint8 tokens)).
    Clips of equal length are batched; each batch is read ``chunk_len`` samples at a time (rounded to the
    total pooling) with the state carried."""
    from tqdm.auto import tqdm

    P = model.config.total_pool
    chunk = max(P, chunk_len // P * P)
    by_len: dict[int, list] = defaultdict(list)
    for clip, tokens in items:
        by_len[len(tokens)].append((clip, tokens))
    total, n = 0.0, 0
    bar = tqdm(total=len(items), desc="scoring", disable=not progress, leave=False)
    for length, group in sorted(by_len.items()):
        for s in range(0, len(group), batch_size):
            part = group[s : s + batch_size]
            batch = [lm_item(t, label=c.label) for c, t in part]
            ids = torch.stack([b["input_ids"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])
            label = torch.stack([b["label"] for b in batch]) if use_labels and model.cond is not None else None
            state = None
            for a in range(0, length, chunk):
                x, y = ids[:, a : a + chunk], labels[:, a : a + chunk]
                last = a + chunk >= length
                out = model(x, label=label, state=state, return_state=not last)
                state = out.state
                total += float(F.cross_entropy(out.logits.float().transpose(1, 2), y, reduction="sum"))
                n += y.numel()
            bar.update(len(part))
    bar.close()
    return total, n


def evaluate_clips(model: AudioUNet, clips: Sequence[Clip], batch_size: int = 8, chunk_len: int = 16_000,
                   use_labels: bool = True, progress: bool = False, what: str = "clips") -> dict:
    """{"nats_per_sample", "bits_per_sample", "samples", "clips", "skipped"} over readable clips."""
    items = load_tokens(clips, model.config.sample_rate, progress, what)
    nats, n = clips_nll(model, items, batch_size, chunk_len, use_labels, progress)
    return {"nats_per_sample": nats / n, "bits_per_sample": nats / n / LN2, "samples": n, "clips": len(items),
            "skipped": len(clips) - len(items)}


def evenly_spaced(clips: Sequence[Clip], k: int | None) -> list[Clip]:
    """At most k clips spread over the list (every class and voice of a sorted split still appears)."""
    if not k or len(clips) <= k:
        return list(clips)
    step = len(clips) / k
    return [clips[int(i * step)] for i in range(k)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="exported model folder or Lightning .ckpt")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", nargs="+", help="audio files and/or folders (every file is scored)")
    src.add_argument("--sc09", help="a Speech Commands / SC09 layout folder (e.g. the digits recipe's)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="with --sc09")
    p.add_argument("--max-clips", type=int, help="score at most this many clips (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chunk-len", type=int, default=16_000)
    p.add_argument("--unconditional", action="store_true", help="score a conditional model without labels")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = load_audio_model(a.ckpt)
    if a.sc09:
        clips, what = speech_commands_splits(a.sc09)[a.split], f"{a.sc09} ({a.split})"
    else:
        clips, what = [Clip(f) for f in list_audio(a.data)], " ".join(a.data)
    clips = evenly_spaced(clips, a.max_clips)
    r = evaluate_clips(model, clips, a.batch_size, a.chunk_len, not a.unconditional, progress=True)
    cond = " given the digit" if model.cond is not None and not a.unconditional and a.sc09 else ""
    print(f"{what}: {r['nats_per_sample']:.4f} nats/sample = {r['bits_per_sample']:.4f} bits/sample{cond} over "
          f"{r['samples']:,} samples in {r['clips']} clips" + (f" ({r['skipped']} skipped)" if r["skipped"] else ""))
    return r


if __name__ == "__main__":
    run_cli(main)


class HeldOutNLL(HeldOutEvaluation):
    """When fitting ends: exact NLL of the data module's ``split`` (whole clips / files, state carried across
    pieces), at most ``max_clips`` of them (evenly spaced), printed in nats and bits per sample."""

    def __init__(self, split: str = "test", max_clips: int | None = 64, batch_size: int = 8):
        super().__init__(split)
        self.max_clips, self.batch_size = max_clips, batch_size

    def evaluate(self, trainer, pl_module) -> dict:
        dm = trainer.datamodule
        clips = evenly_spaced(dm.splits()[self.split], self.max_clips)
        chunk = pl_module.hparams.chunk_len or dm.hparams.clip_len or dm.hparams.seq_len
        r = evaluate_clips(pl_module.model, clips, self.batch_size, chunk, progress=False)
        return {"metric": "nats_per_sample", "value": r["nats_per_sample"], **r,
                "protocol": f"{r['clips']} whole clips, {r['samples']:,} samples, exact; "
                            f"= {r['bits_per_sample']:.4f} bits/sample"}
