"""hiss kernel speed (and scan memory) beside the pure-PyTorch peers, each table from one run.

    python -m benchmarks.scan                         # every section -> docs/benchmarks.md
    python -m benchmarks.scan --sections step conv    # some sections (each replaces only its own block)
    python -m benchmarks.scan --quick                 # small shapes, 3 repeats, prints only

Sections (each writes its own <!-- name:begin --> ... <!-- name:end --> block of docs/benchmarks.md):
  scan    selective scan, the table below
  step    decode-step latency: selective_state_update (Mamba-1 and Mamba-2 layouts), causal_conv1d_update
  conv    causal conv1d (+silu) forward and forward+backward: compiled kernel vs F.conv1d
  ssd     Mamba-2 SSD on CPU: the matmul form (ssd_matmul) vs the compiled scan vs the autograd / recurrence twins
  blocks  Mamba / Mamba2 block tokens/s (forward, forward+backward), hiss vs HF transformers and mambapy
  time_major  the time-major scan (Vim's BiMambaV2) vs the channel-major kernel on transposed views, per build
  prefill_flat  Mamba2 / Mamba block forward CPU time per token at L = 1k..32k (issue 15: flat in L)
  model   MambaLMHeadModel tokens/s: prefill, training step, decode (generation), hiss vs the peers
  gpu     CUDA only (Triton): scan/SSD bandwidth vs peak, time vs L up to 2^20, SSD vs Mamba-1.
          Without a GPU, --gpu-dry-run runs the same code on CPU at tiny sizes (nothing written).

Scan section:
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

from benchmarks._doc import write_section  # noqa: E402
from kernels.shape_checks import run_channel_major  # noqa: E402  (pure Python: loads no kernel)

SHAPES = [(2, 1536, 1024, 16), (1, 256, 65536, 16), (8, 128, 256, 16)]
QUICK_SHAPES = [(2, 256, 512, 16), (1, 64, 4096, 16)]
IMPLS = ["hiss-cpu", "hiss-ref", "hf-torch", "mambapy", "c-loop"]
ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"


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
    p.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    p.add_argument("--gpu-dry-run", action="store_true", help="run the gpu section's code on CPU at tiny sizes")
    p.add_argument("--block-len", type=int, default=1024, help="sequence length of the blocks section")
    args = p.parse_args(argv)
    for name in args.sections:
        t0 = time.perf_counter()
        if name == "scan":
            scan_section(args)
        elif name == "gpu":
            gpu_section(args)
        else:
            body = SECTION_FNS[name](args)
            print(body, flush=True)
            if not args.quick:
                update_doc(name, SECTION_TITLES[name], body)
        print(f"[section {name}: {time.perf_counter() - t0:.0f} s]", flush=True)


def scan_section(args):
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
        update_doc("scan", "Selective scan, CPU", table)


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


def update_doc(key: str, title: str, body: str) -> None:
    """Replace (or append) only the ``<!-- key:begin --> ... <!-- key:end -->`` block of docs/benchmarks.md."""
    write_section(DOC, key, f"## {title}\n\n{body}")
    print(f"wrote {DOC} ({key})")


# ---- shared timing ------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device="cpu", inner: int = 1, clock=time.perf_counter) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` timed batches of ``inner`` calls (one warm-up batch).

    ``clock=time.process_time`` measures this process's CPU time instead of wall time: for single-threaded
    work on a shared machine it leaves out the time other jobs held the core."""
    times = []
    for i in range(repeats + 1):
        _sync(device)
        t0 = clock()
        for _ in range(inner):
            fn()
        _sync(device)
        if i:
            times.append((clock() - t0) / inner)
    return statistics.median(times)


def median_cpu_wall(fn, repeats: int, inner: int = 1) -> tuple[float, float]:
    """(CPU, wall) median seconds per call from the same timed batches (see ``median_time``)."""
    cpu, wall = [], []
    for i in range(repeats + 1):
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(inner):
            fn()
        if i:
            cpu.append((time.process_time() - c0) / inner)
            wall.append((time.perf_counter() - w0) / inner)
    return statistics.median(cpu), statistics.median(wall)


class backend_env:
    """Set $HISS_BACKEND for a block (the ops read it at call time), restoring the old value."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.old = os.environ.get("HISS_BACKEND")
        os.environ["HISS_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("HISS_BACKEND", None)
        else:
            os.environ["HISS_BACKEND"] = self.old


def _header(repeats: int, cmd: str) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"Measured {datetime.datetime.now():%Y-%m-%d %H:%M} on {machine()}; medians of {repeats} runs, "
            f"load average {load:.1f} at the start (shared machine: compare rows of one table, not across "
            f"tables) (`{cmd}`).")


def _fmt_us(t: float) -> str:
    return f"{t * 1e6:.0f}" if t >= 1e-4 else f"{t * 1e6:.1f}"


# ---- step: decode-step latency ------------------------------------------------------------------

def _step_inputs(batch, layout, g):
    if layout[0] == "mamba1":
        _, dim, N = layout
        x = dict(state=torch.randn(batch, dim, N, generator=g), x=torch.randn(batch, dim, generator=g),
                 dt=torch.randn(batch, dim, generator=g) - 1, A=-torch.rand(dim, N, generator=g) - 0.5,
                 B=torch.randn(batch, N, generator=g), C=torch.randn(batch, N, generator=g),
                 D=torch.randn(dim, generator=g), z=torch.randn(batch, dim, generator=g),
                 dt_bias=torch.randn(dim, generator=g) * 0.1)
        return x, True
    _, H, P, N, G = layout  # Mamba2._step's call: dt already softplus'd, per-head A/dt/D broadcast views
    x = dict(state=torch.randn(batch, H, P, N, generator=g), x=torch.randn(batch, H, P, generator=g),
             dt=torch.rand(batch, H, generator=g)[..., None].expand(batch, H, P),
             A=(-torch.rand(H, generator=g) - 0.5)[:, None, None].expand(H, P, N),
             B=torch.randn(batch, G, N, generator=g), C=torch.randn(batch, G, N, generator=g),
             D=torch.randn(H, generator=g)[:, None].expand(H, P), z=None, dt_bias=None)
    return x, False


def step_section(args) -> str:
    from ssm_core.ops import causal_conv1d_update, selective_state_update

    repeats = 3 if args.quick else 5
    inner = 20 if args.quick else 50
    g = torch.Generator().manual_seed(0)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    layouts = [("mamba1", 1536, 16), ("mamba2", 24, 64, 128, 1)]
    if not args.quick:
        layouts = [("mamba1", 768, 16), ("mamba1", 1536, 16), ("mamba2", 24, 64, 128, 1), ("mamba2", 48, 64, 128, 1)]
    for layout in layouts:
        for batch in (1, 8):
            x, softplus = _step_inputs(batch, layout, g)
            res = {}
            for be in ("cpu", "ref"):
                def call(be=be, x=x, sp=softplus):
                    selective_state_update(**x, dt_softplus=sp, backend=be)
                res[be] = median_cpu_wall(call, repeats, inner)
            rows.append((f"selective_state_update {layout[0]} {tuple(x['state'].shape)}", res))
    for dim in (1536, 3072):
        for batch in (1, 8):
            xv, st = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, 3, generator=g)
            w, b = torch.randn(dim, 4, generator=g), torch.randn(dim, generator=g)
            res = {}
            for be in ("cpu", "ref"):
                def call(be=be, a=(xv, st, w, b)):
                    causal_conv1d_update(*a, "silu", backend=be)
                res[be] = median_cpu_wall(call, repeats, inner)
            rows.append((f"causal_conv1d_update (batch, dim, 3) = {(batch, dim, 3)}", res))
    torch.set_num_threads(threads)
    out = [_header(repeats, "python -m benchmarks.scan --sections step"), "",
           f"Per call, one thread (a decode step at these sizes runs on one core in both paths), {inner} calls per "
           "timed batch. CPU µs: this process's CPU time (what the step costs, robust to the other jobs on the "
           "machine); wall µs: elapsed time, inflated by them. `cpu`: the compiled step in kernels/csrc "
           "(dispatched by ssm_core); `ref`: the PyTorch ops in ssm_core.",
           "", "| op (shape) | cpu CPU µs | ref CPU µs | ref / cpu (CPU time) | cpu wall µs | ref wall µs |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in rows:
        (c_cpu, c_wall), (r_cpu, r_wall) = res["cpu"], res["ref"]
        out.append(f"| {name} | {_fmt_us(c_cpu)} | {_fmt_us(r_cpu)} | {r_cpu / c_cpu:.1f}x | {_fmt_us(c_wall)} | "
                   f"{_fmt_us(r_wall)} |")
    return "\n".join(out)


# ---- conv: causal conv1d ------------------------------------------------------------------------

def conv_section(args) -> str:
    import torch.nn.functional as F

    from ssm_core.ops import causal_conv1d

    repeats = 3 if args.quick else 5
    shapes = [(2, 256, 512, 4)] if args.quick else [(2, 1536, 1024, 4), (1, 3072, 2048, 4), (1, 256, 65536, 4)]
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    repeats = 3
    inner = 2  # calls per timed batch: single ms-scale calls are too noisy here
    out = [_header(repeats, "python -m benchmarks.scan --sections conv"), "",
           "`cpu`: kernels/csrc/causal_conv1d_cpu.h (silu fused, carried state, fwd+bwd); `ref`: ssm_core's "
           "PyTorch path (cat state + F.conv1d + silu); `F.conv1d`: a bare depthwise F.conv1d(padding=W-1) + "
           "silu, no state. fwd+bwd includes a loss on the final state for cpu / ref. One thread (with more, "
           "OpenMP's spinning workers make CPU time meaningless). CPU ms: this process's CPU time (the work each "
           "implementation does, robust to the other jobs on the machine); wall ms: elapsed, inflated by them.", "",
           "| (batch, dim, L, W) | impl | forward CPU ms | fwd+bwd CPU ms | forward wall ms | fwd+bwd wall ms |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
    for b, d, L, W in shapes:
        x0 = torch.randn(b, d, L, generator=g)
        w0, b0, s0 = torch.randn(d, W, generator=g), torch.randn(d, generator=g), torch.randn(b, d, W - 1, generator=g)
        res = {}
        for impl in ("cpu", "ref", "F.conv1d"):
            def run(grad, impl=impl, ins=(x0, w0, b0, s0)):
                ts = [t.clone().requires_grad_(grad) for t in ins]
                if impl == "F.conv1d":
                    W_, L_ = ts[1].shape[1], ts[0].shape[-1]
                    y = F.silu(F.conv1d(ts[0], ts[1].unsqueeze(1), ts[2], padding=W_ - 1, groups=ts[1].shape[0]))
                    y = y[..., :L_]
                    loss = y.sum()
                else:
                    y, fin = causal_conv1d(*ts[:3], initial_states=ts[3], return_final_states=True,
                                           activation="silu", backend=impl)
                    loss = y.sum() + fin.sum()
                if grad:
                    loss.backward()
            with torch.no_grad():
                f_cpu, f_wall = median_cpu_wall(lambda run=run: run(False), repeats, inner)
            b_cpu, b_wall = median_cpu_wall(lambda run=run: run(True), repeats, inner)
            res[impl] = (f_cpu, b_cpu, f_wall, b_wall)
        for impl, ts in res.items():
            out.append(f"| {(b, d, L, W)} | {impl} | " + " | ".join(f"{t * 1e3:.2f}" for t in ts) + " |")
        c, f = res["cpu"], res["F.conv1d"]
        out.append(f"| {(b, d, L, W)} | F.conv1d / cpu | " + " | ".join(f"{x / y:.1f}x" for x, y in zip(f, c)) + " |")
    torch.set_num_threads(threads)
    return "\n".join(out)


# ---- ssd: Mamba-2 on CPU ------------------------------------------------------------------------

def _cpu_note() -> str:
    return (f"{torch.get_num_threads()} thread(s); times are this process's CPU time (time.process_time), which "
            "the other jobs on a shared machine inflate far less than wall time")


def ssd_section(args) -> str:
    from ssm_core.ops import mamba_chunk_scan_combined, selective_scan, ssd_ref
    from ssm_core.ops.ssd import ssd_matmul

    repeats = 3
    g = torch.Generator().manual_seed(0)
    Ls = [256] if args.quick else [256, 1024, 4096]
    out = [_header(repeats, "python -m benchmarks.scan --sections ssd"), "",
           " ".join([
               f"Equal sizes: d_inner = nheads x headdim = 24 x 64 = 1536 channels, batch 1; {_cpu_note()}.",
               "A in [-16, -1], Δ = softplus(dt + bias) ~ 0.1 (Mamba-2's init ranges).",
               "`ssd matmul`: ssm_core.ops.ssd.ssd_matmul, the chunked matmul form (chunk 64, blocks of 1024",
               "tokens) with its hand-written backward; `ssd scan`: kernels.cpu.mamba_chunk_scan_combined_cpu, the",
               "compiled Mamba-1 scan on the expanded inputs; `auto` is what mamba_chunk_scan_combined picks",
               "(backend.ssd_cpu_impl); `ssd autograd`: the chunked PyTorch path under autograd (backend='ref',",
               "chunk 256; timed at L <= 1024, once); `ssd recurrence`: ssd_ref, token by token (forward, L = 256,",
               "once); `mamba-1 scan`: the compiled selective scan called directly on pre-expanded inputs.",
               "Last column: the scan's time / ssd matmul's time (> 1: the matmul form is faster).",
           ]), "",
           "| L | N | impl | forward ms | fwd+bwd ms | scan / matmul fwd | scan / matmul fwd+bwd |",
           "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    H, P = 24, 64
    for L in Ls:
        for N in (16, 64, 128):
            x = torch.randn(1, L, H, P, generator=g)
            dt = torch.randn(1, L, H, generator=g) * 0.5 - 2.2
            A = -torch.rand(H, generator=g) * 15 - 1
            B, C = torch.randn(1, L, 1, N, generator=g), torch.randn(1, L, 1, N, generator=g)
            D, bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.1
            u = x.reshape(1, L, H * P).transpose(1, 2).contiguous()
            delta = torch.nn.functional.softplus(dt + bias).repeat_interleave(P, dim=2).transpose(1, 2).contiguous()
            A1 = A.repeat_interleave(P)[:, None].expand(H * P, N).contiguous()
            B1, C1 = B[:, :, 0].transpose(1, 2).contiguous(), C[:, :, 0].transpose(1, 2).contiguous()
            D1 = D.repeat_interleave(P)
            ssd_in = [x, dt, A, B, C, D, bias]

            def ssd(be=None, impl=None):
                def call(t):
                    with ssd_env(impl):
                        return mamba_chunk_scan_combined(*t[:5], 256, D=t[5], dt_bias=t[6], dt_softplus=True,
                                                         backend=be)
                return call

            impls = {
                "ssd matmul": (lambda t: ssd_matmul(*t[:5], D=t[5], dt_bias=t[6], dt_softplus=True), ssd_in),
                "ssd scan": (ssd(impl="scan"), ssd_in),
                "auto": (ssd(), ssd_in),
                "mamba-1 scan": (lambda t: selective_scan(*t, backend="cpu"), [u, delta, A1, B1, C1, D1]),
            }
            if L <= 1024:
                impls["ssd autograd"] = (ssd(be="ref"), ssd_in)
            if L <= 256:
                impls["ssd recurrence"] = (lambda t: ssd_ref(*t[:5], D=t[5], dt_bias=t[6], dt_softplus=True), ssd_in)
            res = {}
            for name, (fn, ins) in impls.items():
                def run(grad, fn=fn, ins=ins):
                    ts = [t.clone().requires_grad_(grad) for t in ins]
                    y = fn(ts)
                    if grad:
                        y.sum().backward()
                once = name in ("ssd recurrence", "ssd autograd")
                with torch.no_grad():
                    fwd = median_time(lambda run=run: run(False), 1 if once else repeats, clock=time.process_time)
                fb = None if name == "ssd recurrence" else \
                    median_time(lambda run=run: run(True), 1 if once else repeats, clock=time.process_time)
                res[name] = (fwd, fb)
                ratio = ("", "")
                if name == "ssd scan":
                    mm = res["ssd matmul"]
                    ratio = (f"{fwd / mm[0]:.2f}", f"{fb / mm[1]:.2f}")
                out.append(f"| {L} | {N} | {name} | {fwd * 1e3:.1f} | {'' if fb is None else f'{fb * 1e3:.1f}'} | "
                           f"{ratio[0]} | {ratio[1]} |")
                print(out[-1], flush=True)
    return "\n".join(out)


class ssd_env:
    """Force backend.ssd_cpu_impl's choice ($HISS_SSD_CPU) for a block; None leaves it alone."""

    def __init__(self, impl: str | None):
        self.impl = impl

    def __enter__(self):
        self.old = os.environ.get("HISS_SSD_CPU")
        if self.impl:
            os.environ["HISS_SSD_CPU"] = self.impl

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("HISS_SSD_CPU", None)
        else:
            os.environ["HISS_SSD_CPU"] = self.old


# ---- blocks and model: tokens/s -----------------------------------------------------------------

D_MODEL = 768


def _hf_mamba_config(n_layer, vocab=256):
    from transformers import MambaConfig as HFMambaConfig

    return HFMambaConfig(vocab_size=vocab, hidden_size=D_MODEL, state_size=16, num_hidden_layers=n_layer,
                         expand=2, conv_kernel=4, use_mambapy=False, eos_token_id=None, pad_token_id=0)


def _block_impls():
    """name -> constructor of a (batch, L, d_model) -> (batch, L, d_model) module, fp32, random weights."""
    impls = {}

    def hiss(layer, backend):
        from ssm_core import Mamba, Mamba2

        def make():
            m = Mamba(d_model=D_MODEL) if layer == 1 else Mamba2(d_model=D_MODEL, headdim=64, d_state=128)
            return m, backend
        return make

    for layer in (1, 2):
        impls[f"hiss Mamba{'' if layer == 1 else '2'} (auto)"] = hiss(layer, "auto")
        if layer == 2:  # the SSD's other CPU fast path, forced: the compiled Mamba-1 scan
            impls["hiss Mamba2 (auto, SSD via the scan)"] = hiss(layer, "auto")
        impls[f"hiss Mamba{'' if layer == 1 else '2'} (ref)"] = hiss(layer, "ref")

    def hf(use_mambapy):
        def make():
            from transformers.models.mamba.modeling_mamba import MambaMixer

            cfg = _hf_mamba_config(1)
            cfg.use_mambapy = use_mambapy
            mixer = MambaMixer(cfg, layer_idx=0)
            mixer.forward = mixer.slow_forward if hasattr(mixer, "slow_forward") else mixer.forward
            return mixer, None
        return make

    impls["HF MambaMixer (torch loop)"] = hf(False)  # use_mambapy=False / True: HF's two CPU paths
    impls["HF MambaMixer (mambapy pscan)"] = hf(True)

    def hf2():
        from transformers import Mamba2Config as HFMamba2Config
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

        cfg = HFMamba2Config(hidden_size=D_MODEL, num_heads=2 * D_MODEL // 64, head_dim=64, state_size=128, n_groups=1,
                             expand=2, conv_kernel=4, num_hidden_layers=1, vocab_size=256)
        return Mamba2Mixer(cfg, layer_idx=0), None  # without mamba_ssm: its PyTorch reference path

    impls["HF Mamba2Mixer (PyTorch path)"] = hf2

    def mambapy_block(layer):
        def make():
            from mambapy.mamba import MambaBlock, MambaConfig

            return MambaBlock(MambaConfig(d_model=D_MODEL, n_layers=1)), None
        return make

    impls["mambapy MambaBlock"] = mambapy_block(1)  # (mambapy.mamba2 imports mamba_ssm: no CPU Mamba2 peer)
    return impls



def _tokens_per_s(module, backend, batch, L, repeats, train: bool, ssd_impl: str | None = None):
    """(wall, CPU) tokens/s: medians over the same timed runs (CPU = this process's CPU time)."""
    x0 = torch.randn(batch, L, D_MODEL)

    def run():
        x = x0.clone().requires_grad_(train)
        y = module(x)
        y = y[0] if isinstance(y, tuple) else y
        if train:
            y.float().pow(2).mean().backward()

    ctx = backend_env(backend) if backend else _nullctx()
    with ctx, ssd_env(ssd_impl):
        if train:
            cpu, wall = median_cpu_wall(run, repeats)
        else:
            with torch.no_grad():
                cpu, wall = median_cpu_wall(run, repeats)
    return batch * L / wall, batch * L / cpu


class _nullctx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def blocks_section(args) -> str:
    repeats = 2 if args.quick else 3
    batch, L = (1, 256) if args.quick else (1, args.block_len)
    out = [_header(repeats, "python -m benchmarks.scan --sections blocks"), "",
           f"One block, d_model {D_MODEL} (d_inner 1536; Mamba: N 16; Mamba2: headdim 64, N 128), batch {batch}, "
           f"L {L}, fp32, random weights, {torch.get_num_threads()} thread(s). hiss `auto` = the CPU fast paths "
           "(Mamba: the compiled scan and the conv kernel; Mamba2: the SSD picked by backend.ssd_cpu_impl, the "
           "matmul form at N 128, and the time-major conv), `SSD via the scan` = Mamba2 with $HISS_SSD_CPU=scan "
           "(the compiled Mamba-1 scan), `ref` = "
           "PyTorch path. tokens/s from wall time and from this process's CPU time (the CPU columns are the ones "
           "to compare on a shared machine). Peers are timed once (hiss: median of the repeats).", "",
           "| block | forward tokens/s | fwd+bwd tokens/s | forward tokens/s (CPU) | fwd+bwd tokens/s (CPU) |",
           "| --- | ---: | ---: | ---: | ---: |"]
    cpu_fb = {}
    for name, make in _block_impls().items():
        torch.manual_seed(0)
        try:
            module, backend = make()
        except Exception as exc:  # a peer missing or incompatible here: say so in the table
            out.append(f"| {name} | unavailable: {type(exc).__name__} | | | |")
            continue
        peer = not name.startswith("hiss")
        impl = "scan" if "via the scan" in name else None
        fwd, fwd_cpu = _tokens_per_s(module, backend, batch, L, 1 if peer else repeats, False, impl)
        if "torch loop" in name:  # fwd+bwd through a Python loop over L: minutes, and mambapy's pscan is faster
            out.append(f"| {name} | {fwd:,.0f} | not timed (sequential loop; see the pscan row) | {fwd_cpu:,.0f} | |")
        else:
            fb, fb_cpu = _tokens_per_s(module, backend, batch, L, 1 if peer else repeats, True, impl)
            cpu_fb[name] = (fwd_cpu, fb_cpu)
            out.append(f"| {name} | {fwd:,.0f} | {fb:,.0f} | {fwd_cpu:,.0f} | {fb_cpu:,.0f} |")
        print(out[-1], flush=True)
    m1, m2, m2s = (cpu_fb.get(k) for k in ("hiss Mamba (auto)", "hiss Mamba2 (auto)",
                                            "hiss Mamba2 (auto, SSD via the scan)"))
    if m1 and m2 and m2s:
        out += ["", f"Mamba2 (auto) / Mamba (auto), CPU tokens/s: forward {m2[0] / m1[0]:.2f}x, forward+backward "
                f"{m2[1] / m1[1]:.2f}x (issue 15's goal: >= 1); with the SSD via the scan: {m2s[0] / m1[0]:.2f}x, "
                f"{m2s[1] / m1[1]:.2f}x."]
    return "\n".join(out)


def prefill_flat_section(args) -> str:
    """Mamba2 / Mamba block forward (prefill, no grad): CPU time per token vs L, in pieces (the default) and in
    one call, and per SSD implementation."""
    from ssm_core import Mamba, Mamba2

    repeats = 2 if args.quick else 3
    Ls = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
    torch.manual_seed(0)
    def one_call(module):  # the whole sequence in one call: what the pieces (ssm_core/modules/prefill.py) avoid
        module.PREFILL_PIECE = 1 << 40
        return module

    blocks = {"Mamba2 (auto: SSD matmul)": (Mamba2(d_model=D_MODEL, headdim=64, d_state=128), None),
              "Mamba2 (SSD via the scan)": (Mamba2(d_model=D_MODEL, headdim=64, d_state=128), "scan"),
              "Mamba2 (auto, one call: no pieces)": (one_call(Mamba2(d_model=D_MODEL, headdim=64, d_state=128)), None),
              "Mamba (N 16)": (Mamba(d_model=D_MODEL), None),
              "Mamba (N 16, one call: no pieces)": (one_call(Mamba(d_model=D_MODEL)), None)}
    out = [_header(repeats, "python -m benchmarks.scan --sections prefill_flat"), "",
           f"One block, d_model {D_MODEL}, batch 1, fp32, forward under no_grad (prefill), {_cpu_note()}. "
           "µs of CPU per token at each L, and that / the value at L = 1024 (issue 15's goal for Mamba2: <= 1.10 "
           "at 32k).", "",
           "| block | " + " | ".join(f"L {L}" for L in Ls) + " | " + " | ".join(f"{L} / 1024" for L in Ls[1:]) + " |",
           "| --- |" + " ---: |" * (2 * len(Ls) - 1)]
    with torch.no_grad():  # warm every block up first (BLAS, allocator, kernels): else the first row pays for it
        for module, impl in blocks.values():
            with ssd_env(impl):
                module(torch.randn(1, Ls[0], D_MODEL))
    for name, (module, impl) in blocks.items():
        per = []
        for L in Ls:
            x = torch.randn(1, L, D_MODEL)

            def run(x=x, module=module):
                module(x)

            with torch.no_grad(), ssd_env(impl):
                per.append(median_time(run, repeats, clock=time.process_time) / L)
            print(f"{name} L={L}: {per[-1] * 1e6:.1f} µs/token", flush=True)
        out.append(f"| {name} | " + " | ".join(f"{p * 1e6:.1f}" for p in per) + " | "
                   + " | ".join(f"{p / per[0]:.2f}" for p in per[1:]) + " |")
    return "\n".join(out)


def model_section(args) -> str:
    from ssm_core import MambaConfig, MambaLMHeadModel

    repeats = 2 if args.quick else 3
    n_layer = 2 if args.quick else 4
    batch, L = (1, 128) if args.quick else (1, 512)
    steps = 8 if args.quick else 32
    vocab = 256
    ids = torch.randint(0, vocab, (batch, L), generator=torch.Generator().manual_seed(0))
    out = [_header(repeats, "python -m benchmarks.scan --sections model"), "",
           f"Language model, d_model {D_MODEL}, {n_layer} layers, vocab {vocab} (bytes), batch {batch}, fp32, random "
           f"weights. Prefill: forward over L = {L} without grad; train: forward + backward of the LM loss at L = {L}; "
           f"decode: {steps} single-token steps from a 16-token prompt's state (median per-token time). hiss "
           "`auto` = compiled CPU kernels (scan, conv, decode step), `ref` = PyTorch path.", "",
           "| model | prefill tokens/s | train tokens/s | decode tokens/s | decode ms / token |",
           "| --- | ---: | ---: | ---: | ---: |"]
    prompt = ids[:, :16]

    def row(name, logits_fn, decode_fn, reps=repeats):
        with torch.no_grad():
            pre = batch * L / median_time(lambda: logits_fn(ids), reps)

        def train():
            logits = logits_fn(ids)
            torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                              ids[:, 1:].reshape(-1)).backward()
        tr = batch * L / median_time(train, reps)
        with torch.no_grad():
            dec = decode_fn()
        out.append(f"| {name} | {pre:,.0f} | {tr:,.0f} | {batch / dec:,.1f} | {dec * 1e3:.2f} |")
        print(out[-1], flush=True)

    for layer in ("Mamba1", "Mamba2"):
        torch.manual_seed(0)
        ssm_cfg = {"layer": layer} if layer == "Mamba1" else {"layer": layer, "headdim": 64, "d_state": 128}
        model = MambaLMHeadModel(MambaConfig(d_model=D_MODEL, n_layer=n_layer, vocab_size=vocab, ssm_cfg=ssm_cfg))
        for backend in ("auto", "ref"):
            def decode(model=model):
                out_ = model(prompt, return_state=True)
                state, tok = out_.state, prompt[:, -1:]

                def one():
                    nonlocal state
                    o = model(tok, state=state, return_state=True)
                    state = o.state
                return median_time(one, repeats, inner=steps)
            with backend_env(backend):
                row(f"hiss {layer} ({backend})", lambda t, model=model: model(t).logits, decode)
    try:
        from transformers import MambaForCausalLM

        torch.manual_seed(0)
        cfg = _hf_mamba_config(n_layer, vocab)
        cfg.use_mambapy = True  # its faster CPU training path (pscan); decode is the same either way
        hf = MambaForCausalLM(cfg).eval()

        def hf_decode():
            # per-token time = (generate n + 1 tokens - generate 1 token) / n, both from the same prompt
            def gen(n):
                return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            t_many = median_time(lambda: gen(steps + 1), 1)
            t_one = median_time(lambda: gen(1), 1)
            return (t_many - t_one) / steps
        row("HF MambaForCausalLM (torch, mambapy pscan)", lambda t: hf(t).logits, hf_decode, reps=1)
    except Exception as exc:  # noqa: BLE001 - a missing peer is reported, not fatal
        out.append(f"| HF MambaForCausalLM | unavailable: {type(exc).__name__}: {exc} | | | |")
    try:
        from mambapy.mamba import Mamba as MPMamba
        from mambapy.mamba import MambaConfig as MPConfig
        from mambapy.mamba import RMSNorm as MPNorm

        class MambapyLM(torch.nn.Module):  # mambapy.lm imports mamba_ssm (via mamba2); same stack here
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(vocab, D_MODEL)
                self.mamba = MPMamba(MPConfig(d_model=D_MODEL, n_layers=n_layer))
                self.norm = MPNorm(D_MODEL)

            def forward(self, t):
                return self.norm(self.mamba(self.emb(t))) @ self.emb.weight.t()

            def step(self, tok, caches):
                x, caches = self.mamba.step(self.emb(tok), caches)
                return self.norm(x) @ self.emb.weight.t(), caches

        torch.manual_seed(0)
        mp = MambapyLM().eval()

        def mp_decode():
            caches = [(None, torch.zeros(batch, 2 * D_MODEL, 3)) for _ in range(n_layer)]
            for i in range(prompt.shape[1]):
                _, caches = mp.step(prompt[:, i], caches)

            def one():
                nonlocal caches
                _, caches = mp.step(prompt[:, -1], caches)
            return median_time(one, repeats, inner=steps)
        row("mambapy Mamba + embedding / norm / tied head (pscan)", mp, mp_decode, reps=1)
    except Exception as exc:  # noqa: BLE001
        out.append(f"| mambapy | unavailable: {type(exc).__name__}: {exc} | | | |")
    return "\n".join(out)


# ---- gpu: Triton kernels on CUDA ----------------------------------------------------------------

# Peak HBM bandwidth (GB/s) by device name, for the bandwidth column; unknown devices print no ratio.
PEAK_GBPS = {"H100 SXM": 3350, "H100 PCIe": 2000, "H100": 3350, "H200": 4800, "A100-SXM4-80GB": 2039,
             "A100-SXM4-40GB": 1555, "A100-PCIE": 1935, "L40S": 864, "A10G": 600, "RTX 4090": 1008}


def _peak_gbps(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, v in PEAK_GBPS.items():
        if key in name:
            return v
    return None


def gpu_section(args) -> None:
    """Scan / SSD on CUDA through the Triton kernels. --gpu-dry-run: the same code on CPU, tiny, not written."""
    from ssm_core.ops import mamba_chunk_scan_combined, selective_scan

    cuda = torch.cuda.is_available()
    if not cuda and not args.gpu_dry_run:
        print("gpu section: no CUDA device here; nothing measured (use --gpu-dry-run to exercise the code on CPU)")
        return
    device = "cuda" if cuda else "cpu"
    backend = "triton" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    repeats = 3 if args.quick or not cuda else 10
    max_log2 = 20 if cuda and not args.quick else 10
    dim, N, H, P, Nssd = (1536, 16, 24, 64, 128) if cuda else (64, 16, 2, 32, 16)
    g = torch.Generator().manual_seed(0)

    def scan_inputs(L):
        u = torch.randn(1, dim, L, generator=g).to(device, dtype)
        delta = (torch.rand(1, dim, L, generator=g) * 0.1).to(device, dtype)
        A = (-torch.rand(dim, N, generator=g) - 0.5).to(device)
        B, C = (torch.randn(1, N, L, generator=g).to(device, dtype) for _ in range(2))
        return u, delta, A, B, C

    def ssd_inputs(L):
        x = torch.randn(1, L, H, P, generator=g).to(device, dtype)
        dt = (torch.rand(1, L, H, generator=g) * 0.1).to(device)
        A = (-torch.rand(H, generator=g) - 0.5).to(device)
        B, C = (torch.randn(1, L, 1, Nssd, generator=g).to(device, dtype) for _ in range(2))
        return x, dt, A, B, C

    peak = _peak_gbps(device)
    esize = torch.finfo(dtype).bits // 8
    rows = []
    for log2 in range(10, max_log2 + 1, 2):
        L = 1 << log2
        si = scan_inputs(L)
        with torch.no_grad():
            t_scan = median_time(lambda si=si: selective_scan(*si, backend=backend), repeats, device)
        # bytes a fused scan must move: u, delta, out (dim x L) and B, C (N x L), each once
        gb = (3 * dim * L + 2 * N * L) * esize / 1e9
        xi = ssd_inputs(L)
        with torch.no_grad():
            t_ssd = median_time(lambda xi=xi: mamba_chunk_scan_combined(*xi, 256, backend=backend), repeats, device)
        rows.append((L, t_scan, gb / t_scan, t_ssd))
        print(f"L=2^{log2}: scan {t_scan * 1e3:.3f} ms ({gb / t_scan:.1f} GB/s), ssd {t_ssd * 1e3:.3f} ms", flush=True)
    if not cuda:
        print("gpu section dry run on CPU done (not written to the docs)")
        return
    out = [_header(repeats, "python -m benchmarks.scan --sections gpu"), "",
           f"{torch.cuda.get_device_name(device)}, {dtype}, batch 1; Mamba-1 scan (dim {dim}, N {N}) and SSD "
           f"(nheads {H} x headdim {P} = {H * P} channels, N {Nssd}, chunk 256), forward, Triton kernels. "
           "Bandwidth: the bytes a fused scan must move (u, delta, out, B, C once) / time"
           + (f"; peak {peak} GB/s." if peak else "."), "",
           "| L | scan ms | scan GB/s | % of peak | SSD ms | SSD / scan time |",
           "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for L, ts, bw, tssd in rows:
        pct = f"{100 * bw / peak:.0f}" if peak else ""
        out.append(f"| {L} | {ts * 1e3:.3f} | {bw:.0f} | {pct} | {tssd * 1e3:.3f} | {tssd / ts:.2f} |")
    body = "\n".join(out)
    print(body)
    if not args.quick:
        update_doc("gpu", "GPU (Triton)", body)


# ---- time_major: the time-major scan (Vim's) against the channel-major kernel on transposed views --------------

def _time_major_calls(kcpu, batch, L, dim, N, G, g):
    """The two ways to run Vim's scan on one set of inputs: (channel-major on transposed views, time-major)."""
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).requires_grad_()

    u, dl, z = r(batch, L, dim), r(batch, L, dim, scale=0.5), r(batch, L, dim)
    B, C, D, bias = r(batch, L, G, N), r(batch, L, G, N), r(dim), r(dim)
    A = (-torch.rand(dim, N, generator=g) * 2).requires_grad_()

    def channel_major():
        return run_channel_major(kcpu.selective_scan_cpu, u, dl, A, B, C, D, z, bias, True, False, None)

    def time_major():
        return kcpu.selective_scan_time_major_cpu(u, dl, A, B, C, D, z, bias, True)

    return channel_major, time_major


def time_major_section(args) -> str:
    import kernels.cpu as kcpu

    ext = kcpu.load()
    shapes = [(16, 17, 64, 16, 2)] if args.quick else [
        (128, 17, 256, 16, 2), (128, 65, 256, 16, 2), (8, 197, 384, 16, 2), (2, 1024, 1536, 16, 1)]
    reps = 3 if args.quick else 15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    builds = ["auto"] + (["avx2"] if ext.isa() == "avx512" else [])
    names = {"auto": f"time-major {ext.isa()}", "avx2": "time-major avx2 (8-wide)"}
    out = [_header(reps, "python -m benchmarks.scan --sections time_major"), "",
           "Median ms of forward / forward+backward over interleaved runs (each implementation in turn), one "
           "thread, fp32, with z, D, delta_bias and softplus, as Vim's BiMambaV2 calls it; `channel-major`: "
           "kernels/csrc/selective_scan_cpu.cpp on transposed views (what the Vim block ran before), `time-major`: "
           "kernels/csrc/scan_time_major_cpu.h.", "",
           "| (batch, L, dim, N, groups) | channel-major | " + " | ".join(names[b] for b in builds)
           + " | fwd+bwd speed-up |",
           "| --- | ---: | " + " | ".join("---:" for _ in builds) + " | ---: |"]
    g = torch.Generator().manual_seed(0)
    for shape in shapes:
        cm, tm = _time_major_calls(kcpu, *shape, g)
        impls = [("channel-major", "auto", cm)] + [(names[b], b, tm) for b in builds]
        times = {k: ([], []) for k, _, _ in impls}
        for i in range(reps + 1):
            for k, build, fn in impls:
                ext.set_isa(build)
                t0 = time.perf_counter()
                y = fn()
                t1 = time.perf_counter()
                y.sum().backward()
                t2 = time.perf_counter()
                if i:  # the first round warms up
                    times[k][0].append(t1 - t0)
                    times[k][1].append(t2 - t0)
        ext.set_isa("auto")
        med = {k: [statistics.median(f), statistics.median(fb)] for k, (f, fb) in times.items()}
        cells = [f"{med[k][0] * 1e3:.2f} / {med[k][1] * 1e3:.2f}" for k, _, _ in impls]
        out.append(f"| {', '.join(map(str, shape))} | " + " | ".join(cells)
                   + f" | {med['channel-major'][1] / med[names['auto']][1]:.2f}x |")
        print(out[-1], flush=True)
    torch.set_num_threads(threads)
    return "\n".join(out)


SECTIONS = ["scan", "step", "conv", "ssd", "blocks", "prefill_flat", "model", "time_major", "gpu"]
SECTION_FNS = {"step": step_section, "conv": conv_section, "ssd": ssd_section, "blocks": blocks_section,
               "prefill_flat": prefill_flat_section, "model": model_section, "time_major": time_major_section}
SECTION_TITLES = {"step": "Decode step, CPU", "conv": "Causal conv1d, CPU", "ssd": "Mamba-2 SSD on CPU",
                  "blocks": "Mamba / Mamba2 blocks, CPU",
                  "prefill_flat": "Mamba2 / Mamba prefill cost per token vs L, CPU",
                  "model": "Language model tokens/s, CPU", "time_major": "Time-major selective scan (Vim), CPU"}

if __name__ == "__main__":
    main()
