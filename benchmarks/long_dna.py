"""Time and peak memory of one DNA training step at L = 2^12 ... 2^20 (apps/genomics/configs/long_1m.yaml).

    python -m benchmarks.long_dna                  # all lengths, writes docs/benchmarks.md + docs/long_dna.png
    python -m benchmarks.long_dna --lengths 4096 65536 --no-docs

Each length runs in a fresh child process (so its peak RSS is its own): the long_1m model (DNALM with
``chunk_len``: exact gradients through ssm_core.chunked_lm_loss), one warm-up step at a short length, then
timed training steps (forward + backward + AdamW) on a (1, L) batch of random bases (the cost does not
depend on the letters). Peak RSS is the child's VmHWM: the whole process, interpreter and torch included.
Target: time(2^20) / time(2^16) <= 18 (linear growth is 16); the script exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks._doc import write_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "apps" / "genomics" / "configs" / "long_1m.yaml"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "long_dna.png"
LENGTHS = [2**k for k in range(12, 21)]
TARGET = 18.0

_CHILD = r"""
import json, sys, time, torch, yaml
from apps.genomics.model import DNALM
from ssm_core import MambaConfig

def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

L, threads, repeats, cfg_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
cfg = yaml.safe_load(open(cfg_path))["model"]
module = DNALM(MambaConfig(**cfg["config"]), chunk_len=cfg["chunk_len"])
opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

def step(n):
    ids = torch.randint(7, 11, (1, n + 1), generator=torch.Generator().manual_seed(n))
    loss, _ = module.lm_loss({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step(256)  # warm-up: kernels loaded, optimiser state allocated
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
before = status("VmRSS:")
times = []
for _ in range(repeats):
    t = time.perf_counter()
    step(L)
    times.append(time.perf_counter() - t)
print(json.dumps({"L": L, "seconds": sorted(times)[len(times) // 2], "peak_rss_mb": status("VmHWM:") / 1024,
                  "rss_before_mb": before / 1024, "chunk_len": cfg["chunk_len"],
                  "params": sum(p.numel() for p in module.parameters())}))
"""


def measure(length: int, threads: int, repeats: int) -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(length), str(threads), str(repeats), str(CONFIG)],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"L={length}: child failed\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    import os
    import platform

    import torch

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} thread(s)), "
            f"Python {platform.python_version()}")


def render(rows: list[dict], threads: int) -> str:
    cfg = yaml.safe_load(CONFIG.read_text())["model"]
    c = cfg["config"]
    out = ["## Million-length DNA training step, CPU", "",
           f"Measured {datetime.date.today()} on {machine(threads)} (`python -m benchmarks.long_dna`). Model: "
           f"`apps/genomics/configs/long_1m.yaml` (Mamba-1, d_model {c['d_model']}, {c['n_layer']} layers, "
           f"{rows[0]['params']:,} parameters), batch 1, chunk_len {cfg['chunk_len']:,}: longer windows are "
           "read in pieces with the state carried and activations recomputed in backward, so gradients are "
           "exact. One step = forward + backward + AdamW; median of 3 steps up to 2^16, one step above. "
           "Peak RSS: the child process's VmHWM (interpreter and torch included).", "",
           "| L | step s | s per 1M bases | peak RSS MB |", "| ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| 2^{r['L'].bit_length() - 1} = {r['L']:,} | {r['seconds']:.2f} | "
                   f"{r['seconds'] / r['L'] * 2**20:.1f} | {r['peak_rss_mb']:.0f} |")
    by = {r["L"]: r for r in rows}
    if 2**20 in by and 2**16 in by:
        ratio = by[2**20]["seconds"] / by[2**16]["seconds"]
        out += ["", f"time(2^20) / time(2^16) = {ratio:.1f} (target <= {TARGET:g}; 16 is linear): "
                    f"{'met' if ratio <= TARGET else 'MISSED'}. Plot: `docs/long_dna.png`."]
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [r["L"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].loglog(L, [r["seconds"] for r in rows], "o-", base=2, label="measured")
    ax[0].loglog(L, [rows[0]["seconds"] * n / L[0] for n in L], "--", base=2, color="grey", label="linear")
    ax[0].set(xlabel="sequence length L", ylabel="seconds per training step", title="time")
    ax[0].legend()
    ax[1].semilogx(L, [r["peak_rss_mb"] / 1024 for r in rows], "o-", base=2)
    ax[1].set(xlabel="sequence length L", ylabel="peak RSS (GB)", title="memory", ylim=(0, None))
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    tmp = PLOT.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(PLOT)  # atomic: a reader never sees half a PNG


def update_doc(block: str) -> None:
    write_section(DOC, "long_dna", block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (1: steadier on a shared box)")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    args = p.parse_args(argv)
    rows = []
    for n in sorted(args.lengths):
        r = measure(n, args.threads, 3 if n <= 2**16 else 1)
        rows.append(r)
        print(f"L={n:>9,}  step {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB", flush=True)
    block = render(rows, args.threads)
    print(block)
    if not args.no_docs:
        update_doc(block)
        plot(rows)
        print(f"wrote {DOC} and {PLOT}")
    by = {r["L"]: r for r in rows}
    if 2**20 in by and 2**16 in by and by[2**20]["seconds"] / by[2**16]["seconds"] > TARGET:
        print(f"target missed: time(2^20) / time(2^16) > {TARGET:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
