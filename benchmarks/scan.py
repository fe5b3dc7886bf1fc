"""Selective-scan speed and memory, hiss's backends beside the pure-PyTorch peers, in one run.

    python -m benchmarks.scan                    # full table -> docs/benchmarks.md
    python -m benchmarks.scan --quick            # small shapes, 3 repeats, prints only

Implementations (forward, and forward+backward where they have one):
  hiss-cpu      ssm_core.selective_scan(backend="cpu"): the compiled kernel in kernels/
  hiss-ref      ssm_core.selective_scan(backend="ref"): the chunked PyTorch path
  hf-torch      transformers.models.mamba.modeling_mamba.mamba_selective_scan (sequential torch loop)
  mambapy       the same function with use_mambapy=True (mambapy's Blelloch pscan)
  c-loop        a plain single-threaded C loop of the recurrence (benchmarks/c_loop.c), forward only

Times are medians of --repeats runs; peak memory is the growth of the peak RSS of a fresh child
process running one forward+backward (so allocator caches of other cases don't leak in).
Targets (issue 3): fwd+bwd >= 20x faster than the faster peer at the first two shapes; forward
within 2x of the C loop; peak memory at (1, 256, 65536, 16) <= 1/4 of the peers'.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPES = [(2, 1536, 1024, 16), (1, 256, 65536, 16), (8, 128, 256, 16)]
QUICK_SHAPES = [(2, 256, 512, 16), (1, 64, 4096, 16)]
IMPLS = ["hiss-cpu", "hiss-ref", "hf-torch", "mambapy", "c-loop"]
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- scan:begin -->", "<!-- scan:end -->"


def make_inputs(shape, requires_grad=False, seed=0):
    b, d, L, N = shape
    g = torch.Generator().manual_seed(seed)
    t = dict(
        u=torch.randn(b, d, L, generator=g), delta=torch.rand(b, d, L, generator=g) * 0.1,
        A=-torch.rand(d, N, generator=g) * 2 - 0.5, B=torch.randn(b, N, L, generator=g),
        C=torch.randn(b, N, L, generator=g), D=torch.randn(d, generator=g),
    )
    for v in t.values():
        v.requires_grad_(requires_grad)
    return t


_C_LIB = None


def c_loop():
    global _C_LIB
    if _C_LIB is None:
        out = Path(tempfile.gettempdir()) / f"hiss_c_loop_{os.getuid()}.so"
        subprocess.run(["cc", "-O3", "-shared", "-fPIC", "-o", str(out), str(ROOT / "benchmarks" / "c_loop.c"), "-lm"],
                       check=True)
        _C_LIB = ctypes.CDLL(str(out))
    return _C_LIB


def run_impl(name, x):
    """One call; returns the output (for backward)."""
    if name in ("hiss-cpu", "hiss-ref"):
        from ssm_core import selective_scan

        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], backend=name.split("-")[1])
    if name in ("hf-torch", "mambapy"):
        from transformers.models.mamba.modeling_mamba import mamba_selective_scan

        return mamba_selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"],
                                    use_mambapy=name == "mambapy")
    if name == "c-loop":
        b, d, L = x["u"].shape
        N = x["A"].shape[1]
        out = torch.empty(b, d, L)
        ptr = [t.detach().contiguous() for t in (x["u"], x["delta"], x["A"], x["B"], x["C"])]
        c_loop().scan_fwd(*(ctypes.c_void_p(t.data_ptr()) for t in ptr), ctypes.c_void_p(out.data_ptr()),
                          b, d, L, N)
        return out
    raise ValueError(name)


def timed(name, shape, backward, repeats):
    x = make_inputs(shape, requires_grad=backward)
    times = []
    for i in range(repeats + 1):  # the first run warms up (kernel build, allocator)
        t0 = time.perf_counter()
        y = run_impl(name, x)
        if backward:
            y.sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


_CHILD = """
import sys, torch
from benchmarks.scan import make_inputs, run_impl

def status(key):  # kB, from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

torch.set_num_threads(int(sys.argv[3]))
run_impl(sys.argv[1], make_inputs((1, 8, 64, 4), requires_grad=True)).sum().backward()  # warm up
x = make_inputs(tuple(int(v) for v in sys.argv[2].split(",")), requires_grad=True)
open("/proc/self/clear_refs", "w").write("5")  # reset the peak-RSS mark (VmHWM)
base = status("VmRSS:")
run_impl(sys.argv[1], x).sum().backward()
print((status("VmHWM:") - base) / 1024)
"""


def peak_memory_mb(name, shape) -> float:
    """Peak RSS growth (MB) of a child process doing one forward+backward on ready inputs."""
    res = subprocess.run([sys.executable, "-c", _CHILD, name, ",".join(map(str, shape)), str(torch.get_num_threads())],
                         cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    return float(res.stdout.strip().splitlines()[-1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="small shapes, 3 repeats, no docs update")
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--slow-peer-repeats", type=int, default=None,
                   help="repeats for hf-torch / mambapy at shapes with L >= 16384 (they take minutes)")
    args = p.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 3 if args.quick else args.repeats
    rows = []
    for shape in shapes:
        res = {}
        for name in args.impls:
            r = repeats
            if name in ("hf-torch", "mambapy") and shape[2] >= 16384 and args.slow_peer_repeats:
                r = args.slow_peer_repeats
            fwd = timed(name, shape, False, r)
            fb = None if name == "c-loop" else timed(name, shape, True, r)
            mem = None if (args.no_memory or name == "c-loop") else peak_memory_mb(name, shape)
            res[name] = (fwd, fb, mem)
            print(f"{shape} {name:9s} fwd {fwd * 1e3:9.1f} ms  fwd+bwd "
                  f"{'-' if fb is None else f'{fb * 1e3:9.1f} ms'}  peak {'-' if mem is None else f'{mem:.0f} MB'}",
                  flush=True)
        rows.append((shape, res))
    table = render(rows, repeats)
    print(table)
    if not args.quick:
        update_doc(table)


def render(rows, repeats) -> str:
    out = [f"Measured {datetime.date.today()} on {machine()}; medians of {repeats} runs "
           "(`python -m benchmarks.scan`).", "",
           "| (batch, dim, L, N) | impl | forward ms | fwd+bwd ms | peak MB (fwd+bwd) |",
           "| --- | --- | ---: | ---: | ---: |"]
    for shape, res in rows:
        for name, (fwd, fb, mem) in res.items():
            out.append(f"| {shape} | {name} | {fwd * 1e3:.1f} | {'' if fb is None else f'{fb * 1e3:.1f}'} | "
                       f"{'' if mem is None else f'{mem:.0f}'} |")
    out += ["", "Ratios (hiss-cpu vs the faster peer of hf-torch / mambapy; forward vs the C loop):", ""]
    for shape, res in rows:
        if "hiss-cpu" not in res:
            continue
        fwd, fb, mem = res["hiss-cpu"]
        peers = [res[p] for p in ("hf-torch", "mambapy") if p in res]
        parts = []
        if peers:
            parts.append(f"fwd+bwd speed-up {min(p[1] for p in peers) / fb:.1f}x")
            mems = [p[2] for p in peers if p[2] is not None]
            if mems and mem is not None:
                parts.append(f"peak memory {mem / min(mems):.2f} of the leaner peer")
        if "c-loop" in res:
            parts.append(f"forward {fwd / res['c-loop'][0]:.2f}x the C loop's time")
        out.append(f"- {shape}: " + "; ".join(parts))
    return "\n".join(out)


def update_doc(table: str) -> None:
    DOC.parent.mkdir(exist_ok=True)
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n## Selective scan, CPU\n\n{table}\n{END}"
    if BEGIN in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
