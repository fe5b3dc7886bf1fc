"""Time and peak memory of one DNA training step at L = 2^12 ... 2^22 (apps/genomics/configs/long_1m.yaml).

    python -m benchmarks.long_dna                        # 2^12, 2^14 ... 2^22: docs/benchmarks.md + docs/long_dna.png
    python -m benchmarks.long_dna --lengths 2^16 2^20 --no-docs
    python -m benchmarks.long_dna --attribute 2^18       # where the memory of one step goes (no docs)

Each length runs in a fresh child process (so its peak RSS is its own): the long_1m model (DNALM with
``chunk_len``: exact gradients through ssm_core.chunked_lm_loss), one warm-up step at a short length, then
timed training steps (forward + backward + AdamW) on a (1, L) batch of random bases given as the data module
gives them (separate int64 ``input_ids`` and ``labels``; the cost does not depend on the letters). Peak RSS is
the child's VmHWM: the whole process, interpreter and torch included.

Targets (the script exits 1 when one is missed): peak RSS <= 8 GB at every length; time linear in L:
time(2^20) / time(2^16) <= 18 (16 is linear) and time(2^22) / time(2^20) <= 4.5 (4 is linear).
Bytes per base is the slope of peak RSS between the two longest lengths measured; peaks at 2^22 and 2^23 that
were not measured are projected from it, and the table says so.

``--attribute L`` runs one step and reports RSS after building the batch, after the forward, after
``malloc_trim(0)`` (glibc hands back the freed pages: what is left is live memory), and the peak of the
backward: it separates live tensors from allocator retention.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from benchmarks._doc import write_section

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "apps" / "genomics" / "configs" / "long_1m.yaml"
DOC = ROOT / "docs" / "benchmarks.md"
PLOT = ROOT / "docs" / "long_dna.png"
LENGTHS = [2**k for k in (12, 14, 16, 18, 20, 22)]
MAX_LENGTH = 2**23  # E. coli's 4.6 Mb chromosome fits in one window
TARGET = 18.0  # time(2^20) / time(2^16)
TARGET_22 = 4.5  # time(2^22) / time(2^20)
RSS_BUDGET_MB = 8 * 1024

_CHILD = r"""
import ctypes, json, sys, time, torch, yaml
from apps.genomics.model import DNALM
from ssm_core import MambaConfig

def status(key):  # MB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024

L, threads, repeats, cfg_path, mode = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.set_num_threads(threads)
cfg = yaml.safe_load(open(cfg_path))["model"]
module = DNALM(MambaConfig(**cfg["config"]), chunk_len=cfg["chunk_len"])
opt = torch.optim.AdamW(module.parameters(), lr=1e-3)

def batch(n):
    w = torch.randint(7, 11, (n + 1,), generator=torch.Generator().manual_seed(n))
    return {"input_ids": w[:-1].clone()[None], "labels": w[1:].clone()[None]}  # as apps.genomics.data makes them

def step(n):
    loss, _ = module.lm_loss(batch(n))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)

step(256)  # warm-up: kernels loaded, optimiser state allocated
if L > cfg["chunk_len"]:
    step(2 * cfg["chunk_len"])  # and the chunked path once
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
before = status("VmRSS:")
if mode == "attribute":
    libc = ctypes.CDLL("libc.so.6")
    r = {"L": L, "rss_before_mb": before}
    b = batch(L)
    r["batch_mb"] = status("VmRSS:")
    loss, _ = module.lm_loss(b)
    r["after_forward_mb"] = status("VmRSS:")
    libc.malloc_trim(0)
    r["after_forward_trim_mb"] = status("VmRSS:")
    open("/proc/self/clear_refs", "w").write("5")
    loss.backward()
    r["backward_peak_mb"] = status("VmHWM:")
    print(json.dumps(r))
    sys.exit(0)
times = []
for _ in range(repeats):
    t = time.perf_counter()
    step(L)
    times.append(time.perf_counter() - t)
print(json.dumps({"L": L, "seconds": sorted(times)[len(times) // 2], "peak_rss_mb": status("VmHWM:"),
                  "rss_before_mb": before, "chunk_len": cfg["chunk_len"],
                  "params": sum(p.numel() for p in module.parameters())}))
"""


def parse_length(text: str) -> int:
    """'4096', '2^22' or '2**22' -> int, 1 <= L <= 2^23."""
    t = text.replace("**", "^")
    try:
        n = 2 ** int(t[2:]) if t.startswith("2^") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (an integer or 2^k)") from None
    if not 1 <= n <= MAX_LENGTH:
        raise argparse.ArgumentTypeError(f"length {n:,} outside 1 .. 2^23")
    return n


def measure(length: int, threads: int, repeats: int, mode: str = "time") -> dict:
    res = subprocess.run([sys.executable, "-c", _CHILD, str(length), str(threads), str(repeats), str(CONFIG), mode],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"L={length}: child failed\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    import platform

    import torch

    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads} thread(s)), "
            f"Python {platform.python_version()}")


def load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def bytes_per_base(rows: list[dict]) -> float | None:
    """Slope of peak RSS (bytes per base) between the two longest measured lengths above one piece."""
    long = [r for r in rows if r["L"] > r["chunk_len"]]
    if len(long) < 2:
        return None
    a, b = long[-2], long[-1]
    return (b["peak_rss_mb"] - a["peak_rss_mb"]) * 2**20 / (b["L"] - a["L"])


def projections(rows: list[dict]) -> dict[int, float]:
    """Peak RSS (MB) projected at 2^22 and 2^23 where not measured: longest measured + slope * extra bases."""
    slope = bytes_per_base(rows)
    if slope is None:
        return {}
    last = rows[-1]
    measured = {r["L"] for r in rows}
    return {n: last["peak_rss_mb"] + max(slope, 0.0) * (n - last["L"]) / 2**20
            for n in (2**22, 2**23) if n not in measured and n > last["L"]}


def checks(rows: list[dict]) -> list[tuple[str, bool]]:
    """(description, met) for every target the measured lengths allow."""
    by = {r["L"]: r for r in rows}
    out = []
    peak = max(rows, key=lambda r: r["peak_rss_mb"])
    out.append((f"peak RSS <= 8 GB at every length (max {peak['peak_rss_mb']:.0f} MB at L = {peak['L']:,})",
                all(r["peak_rss_mb"] <= RSS_BUDGET_MB for r in rows)))
    if 2**20 in by and 2**16 in by:
        ratio = by[2**20]["seconds"] / by[2**16]["seconds"]
        out.append((f"time(2^20) / time(2^16) = {ratio:.1f} (target <= {TARGET:g}; 16 is linear)", ratio <= TARGET))
    if 2**22 in by and 2**20 in by:
        ratio = by[2**22]["seconds"] / by[2**20]["seconds"]
        out.append((f"time(2^22) / time(2^20) = {ratio:.2f} (target <= {TARGET_22:g}; 4 is linear)",
                    ratio <= TARGET_22))
    return out


def render(rows: list[dict], threads: int, loads: tuple[str, str]) -> str:
    cfg = yaml.safe_load(CONFIG.read_text())["model"]
    c = cfg["config"]
    out = ["## Chromosome-length DNA training step, CPU", "",
           f"Measured {datetime.date.today()} on {machine(threads)} (`python -m benchmarks.long_dna`), load average "
           f"(1/5/15 min) {loads[0]} at the start and {loads[1]} at the end (a shared box: times are noisy, "
           "memory is not). Model: "
           f"`apps/genomics/configs/long_1m.yaml` (Mamba-1, d_model {c['d_model']}, {c['n_layer']} layers, "
           f"{rows[0]['params']:,} parameters), batch 1, chunk_len {cfg['chunk_len']:,}: longer windows are "
           "read in pieces with the state carried and activations recomputed in backward, so gradients are "
           "exact. One step = forward + backward + AdamW on separate int64 `input_ids` / `labels` (as the data "
           "module makes them); median of 3 steps up to 2^16, one step above. Peak RSS: the child process's "
           "VmHWM (interpreter and torch included).", "",
           "| L | step s | s per 1M bases | peak RSS MB |", "| ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| 2^{r['L'].bit_length() - 1} = {r['L']:,} | {r['seconds']:.2f} | "
                   f"{r['seconds'] / r['L'] * 2**20:.1f} | {r['peak_rss_mb']:.0f} |")
    for n, mb in projections(rows).items():
        out.append(f"| 2^{n.bit_length() - 1} = {n:,} | not run | | {mb:.0f} (projected) |")
    slope = bytes_per_base(rows)
    out.append("")
    if slope is not None:
        long = [r for r in rows if r["L"] > r["chunk_len"]]
        out.append(f"Peak RSS grows {slope:.0f} bytes per base between L = {long[-2]['L']:,} and {long[-1]['L']:,}"
                   + (" (rows marked projected extend that slope; they were not run)." if projections(rows)
                      else "."))
    for text, met in checks(rows):
        out.append(f"- {text}: {'met' if met else 'MISSED'}")
    out += ["", "Plot: `docs/long_dna.png`."]
    return "\n".join(out)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [r["L"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].loglog(L, [r["seconds"] for r in rows], "o-", base=2, label="measured")
    ax[0].loglog(L, [rows[-1]["seconds"] * n / L[-1] for n in L], "--", base=2, color="grey", label="linear")
    ax[0].set(xlabel="sequence length L", ylabel="seconds per training step", title="time")
    ax[0].legend()
    ax[1].semilogx(L, [r["peak_rss_mb"] / 1024 for r in rows], "o-", base=2)
    ax[1].axhline(RSS_BUDGET_MB / 1024, ls="--", color="grey", label="8 GB budget")
    ax[1].set(xlabel="sequence length L", ylabel="peak RSS (GB)", title="memory", ylim=(0, None))
    ax[1].legend()
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    tmp = PLOT.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(PLOT)  # atomic: a reader never sees half a PNG


def update_doc(block: str) -> None:
    write_section(DOC, "long_dna", block)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=parse_length, nargs="+", default=LENGTHS, help="integers or 2^k, up to 2^23")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (1: steadier on a shared box)")
    p.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    p.add_argument("--json", help="also write the measured rows here")
    p.add_argument("--from-json", metavar="PATH", help="render (and write docs) from rows saved by --json; no runs")
    p.add_argument("--attribute", type=parse_length, metavar="L",
                   help="one step at L: RSS after the batch, the forward, malloc_trim, and the backward peak")
    args = p.parse_args(argv)
    if args.attribute:
        r = measure(args.attribute, args.threads, 1, mode="attribute")
        base, n = r["rss_before_mb"], r["L"]
        for key in ("batch_mb", "after_forward_mb", "after_forward_trim_mb", "backward_peak_mb"):
            grow = r[key] - base
            print(f"L={n:,}  {key[:-3]:<22} RSS {r[key]:8.0f} MB  (+{grow:7.1f} MB, {grow * 2**20 / n:8.1f} B/base)")
        return 0
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, loads = saved["rows"], tuple(saved["load_average"])
    else:
        loads = [load_average()]
        rows = []
        for n in sorted(set(args.lengths)):
            r = measure(n, args.threads, 3 if n <= 2**16 else 1)
            rows.append(r)
            print(f"L={n:>9,}  step {r['seconds']:8.2f} s  peak RSS {r['peak_rss_mb']:7.0f} MB  "
                  f"(load {load_average()})", flush=True)
        loads.append(load_average())
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": rows, "load_average": loads}, indent=1))
    block = render(rows, args.threads, tuple(loads))
    print(block)
    if not args.no_docs:
        update_doc(block)
        plot(rows)
        print(f"wrote {DOC} and {PLOT}")
    missed = [text for text, met in checks(rows) if not met]
    for text in missed:
        print(f"target missed: {text}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
