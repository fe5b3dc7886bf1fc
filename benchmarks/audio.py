"""Audio generation speed on the CPU, end to end: samples/s of ``apps.audio.generate.stream`` beside real time.

    python -m benchmarks.audio                     # default + 6M SC09 models, batch 1 and 16, one thread
    python -m benchmarks.audio --write-doc         # also replace the results block in docs/audio.md
    python -m benchmarks.audio --models default --batches 1 --threads 1 2 --seconds 2

Each row generates ``--seconds`` of audio summed over the batch (after a warm-up) with one model, through the
same call the CLI and the demo make (``stream``: prefill, steps, sampling at temperature 1, chunks of 0.1 s),
with the compiled path (apps.audio.fast: steps *and* sampling in C++, many steps per call) and, for comparison,
the Python path (ssm_core blocks, one module call per layer, torch's softmax + multinomial per step). It reports
new samples per second summed over the batch, the multiple of real time (16,000 samples/s), and samples per
second of process CPU time: on a shared machine wall time depends on what else runs, CPU time much less.
Weights are random (speed does not depend on them; the default model has the shipped checkpoint's shape).
Not a timed test: numbers depend on the machine and on its load; the block in docs/audio.md states both.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from apps.audio.fast import build_info, fast_unavailable_reason
from apps.audio.generate import stream
from apps.audio.model import AudioUNet, UNetConfig

MODELS = {
    "default": UNetConfig(d_model=32, n_layers=[1, 2, 2], ssm_cfg={"d_state": 8}, n_classes=10),
    "sc09_6m": UNetConfig(d_model=64, n_layers=8, ssm_cfg={"d_state": 16}),
}
REAL_TIME = 16_000


def measure(model: AudioUNet, batch: int, seconds: float, fast: bool, threads: int) -> tuple[float, float]:
    """(samples/s of wall time, samples/s of process CPU time), new samples summed over the batch."""
    torch.set_num_threads(threads)
    per_row = int(seconds * REAL_TIME / batch / (1 if fast else 20))
    per_row = max(per_row, 200)
    label = 3 if model.cond is not None else None
    for _ in stream(model, 64, batch, label=label, seed=0, fast=fast, threads=threads):  # warm-up
        pass
    t0, c0 = time.perf_counter(), time.process_time()
    n = sum(piece.shape[1] for piece in stream(model, per_row, batch, label=label, seed=0, fast=fast,
                                               threads=threads))
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    return n * batch / dt, n * batch / max(dc, 1e-9)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--seconds", type=float, default=2.0,
                   help="audio per measurement, summed over the batch (the Python path does 1/20 of it)")
    p.add_argument("--no-python", action="store_true", help="skip the (slow) Python-path rows")
    p.add_argument("--write-doc", action="store_true", help="write the table into docs/audio.md")
    a = p.parse_args(argv)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
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
                        print(f"{name}: compiled path unavailable ({reason})")
                        continue
                    if not fast and (a.no_python or threads != 1):
                        continue
                    rate, cpu_rate = measure(model, batch, a.seconds, fast, threads)
                    row = {"model": name, "params": params, "batch": batch, "threads": threads,
                           "path": "compiled" if fast else "python", "samples_per_s": rate,
                           "samples_per_cpu_s": cpu_rate}
                    rows.append(row)
                    print(f"{name:8s} {params:>10,} params  batch {batch:>2}  threads {threads}  {row['path']:8s}  "
                          f"{rate:>9,.0f} samples/s = {rate / REAL_TIME:5.2f}x real time   "
                          f"{cpu_rate:>9,.0f} per CPU-s = {cpu_rate / REAL_TIME:5.2f}x", flush=True)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    if a.write_doc:
        from pathlib import Path

        from benchmarks._doc import write_section

        isa = build_info() if not any(fast_unavailable_reason(AudioUNet(MODELS[m])) for m in a.models) else "-"
        lines = [f"Measured by `python -m benchmarks.audio` on {platform.machine()}, {os.cpu_count()} CPU cores, "
                 f"torch {torch.__version__}, compiled path built with {isa}. Load average (1 / 5 / 15 min) "
                 f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f} before the run and "
                 f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f} after it (other jobs share "
                 f"this machine). End to end, sampling included (temperature 1).",
                 "", "| model | parameters | batch | threads | path | samples/s | x real time | samples/CPU-s "
                 "| x real time (CPU) |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['model']} | {r['params']:,} | {r['batch']} | {r['threads']} | {r['path']} | "
                         f"{r['samples_per_s']:,.0f} | {r['samples_per_s'] / REAL_TIME:.2f} | "
                         f"{r['samples_per_cpu_s']:,.0f} | {r['samples_per_cpu_s'] / REAL_TIME:.2f} |")
        write_section(Path(__file__).resolve().parents[1] / "docs" / "audio.md", "audio_speed", "\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
