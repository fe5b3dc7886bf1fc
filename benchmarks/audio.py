"""Audio generation speed on the CPU: samples/s of the waveform U-Net's recurrent step, beside real time.

    python -m benchmarks.audio                     # default + 6M SC09 models, batch 1 and 16, 1 and 2 threads
    python -m benchmarks.audio --write-doc         # also replace the results block in docs/audio.md
    python -m benchmarks.audio --models default --batches 1 --seconds 2

Each row steps ``--seconds`` of audio (after a warm-up) through one model with the compiled whole-network step
(apps.audio.fast) and, for comparison, the Python step (ssm_core blocks, one module call per layer), and
reports new samples per second summed over the batch and the multiple of real time (16,000 samples/s).
Weights are random (speed does not depend on them; the default model has the shipped checkpoint's shape).
Sampling is included (the 256-way softmax and a multinomial draw per row). Not a timed test: numbers depend on
the machine and on what else runs on it; the block in docs/audio.md states the machine and load.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from apps.audio.fast import FastStepper, fast_unavailable_reason
from apps.audio.model import AudioUNet, UNetConfig
from ssm_core.models.generation import sample_logits

MODELS = {
    "default": UNetConfig(d_model=32, n_layers=[1, 2, 2], ssm_cfg={"d_state": 8}, n_classes=10),
    "sc09_6m": UNetConfig(d_model=64, n_layers=8, ssm_cfg={"d_state": 16}),
}
REAL_TIME = 16_000


def measure(model: AudioUNet, batch: int, seconds: float, fast: bool, threads: int) -> float:
    torch.set_num_threads(threads)
    n = max(16, int(seconds * REAL_TIME / batch)) if fast else max(16, int(seconds * REAL_TIME / batch / 20))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        state = model.empty_state(batch)
        token = torch.full((batch,), 128, dtype=torch.long)
        stepper = FastStepper(model, state, threads=threads) if fast else None
        cond = model.conditioning(None, batch)

        def one(tok, st):
            if stepper is not None:
                return stepper.step(tok), st
            return model.step(tok, st, cond=cond)

        for _ in range(32):  # warm-up
            logits, state = one(token, state)
            token = sample_logits(logits, 1.0, generator=gen)
        t0 = time.perf_counter()
        for _ in range(n):
            logits, state = one(token, state)
            token = sample_logits(logits, 1.0, generator=gen)
        dt = time.perf_counter() - t0
    return n * batch / dt


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seconds", type=float, default=1.0, help="audio per measurement (compiled step)")
    p.add_argument("--no-python", action="store_true", help="skip the (slow) Python-step rows")
    p.add_argument("--write-doc", action="store_true", help="write the table into docs/audio.md")
    a = p.parse_args(argv)
    rows = []
    for name in a.models:
        torch.manual_seed(0)
        model = AudioUNet(MODELS[name]).eval()
        params = sum(q.numel() for q in model.parameters())
        reason = fast_unavailable_reason(model)
        for batch in a.batches:
            for threads in a.threads:
                for fast in (True, False):
                    if fast and reason:
                        print(f"{name}: compiled step unavailable ({reason})")
                        continue
                    if not fast and (a.no_python or threads != 1):
                        continue
                    rate = measure(model, batch, a.seconds, fast, threads)
                    row = {"model": name, "params": params, "batch": batch, "threads": threads,
                           "step": "compiled" if fast else "python", "samples_per_s": rate}
                    rows.append(row)
                    print(f"{name:8s} {params:>10,} params  batch {batch:>2}  threads {threads}  {row['step']:8s}  "
                          f"{rate:>9,.0f} samples/s  = {rate / REAL_TIME:5.2f}x real time", flush=True)
    if a.write_doc:
        from pathlib import Path

        from benchmarks._doc import write_section

        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        lines = [f"Measured by `python -m benchmarks.audio` on {platform.machine()}, {os.cpu_count()} CPU cores "
                 f"(load average {load:.1f} when it ran; other jobs share this machine), torch {torch.__version__}.",
                 "", "| model | parameters | batch | threads | step | samples/s | x real time |",
                 "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['threads']} | {r['step']} | "
                         f"{r['samples_per_s']:,.0f} | {r['samples_per_s'] / REAL_TIME:.2f} |")
        write_section(Path(__file__).resolve().parents[1] / "docs" / "audio.md", "audio_speed", "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
