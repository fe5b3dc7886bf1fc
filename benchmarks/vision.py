"""Vim-Ti vs DeiT-Ti (timm's own model) against image resolution: time per image and peak memory, inference and
one training step (forward + backward), CPU now, GPU when there is one.

    python -m benchmarks.vision                                   # CPU: 224 .. 1024 px, batch 1, 2 threads
    python -m benchmarks.vision --sizes 224 512 1024 1248 --device cuda --batch 8 --dtype bf16
    python -m benchmarks.vision --out docs/img/vision_scaling     # writes .json, .md table and .png plot

Each (model, size, mode) runs in a fresh subprocess so peak memory is its own: on CPU the peak resident set
(VmHWM, reset via /proc/self/clear_refs after the model and input are built and the kernels loaded on a tiny
copy; large blocks mmapped so freed memory leaves the resident set) during the first full-size step, minus the
resident set before it; on CUDA torch.cuda.max_memory_allocated minus the allocation before the step. Time: the
median of ``--repeats`` runs after that step, divided by the batch: process CPU seconds on CPU (all threads
summed; on a shared machine wall time measures the neighbours), wall seconds on GPU; both are in the JSON.
Both models are the ImageNet shapes (patch 16, width 192): Vim-Ti 7.1M parameters, DeiT-Ti 5.7M, position
embeddings sized for each resolution. The summary
says where the curves cross (the smallest size from which Vim is faster / lighter). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = {"vim_tiny": "vim_tiny_patch16_224", "deit_tiny": "deit_tiny_patch16_224"}


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(model_key: str, size: int, mode: str, device: str, batch: int, repeats: int, threads: int,
            dtype: str) -> dict:
    """One measurement in this process (run through the subprocess entry below)."""
    import timm
    import torch

    import apps.vision  # noqa: F401 - registers vim_*

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = timm.create_model(MODELS[model_key], img_size=size, num_classes=1000).to(device)
    model.train(mode == "train")
    x = torch.randn(batch, 3, size, size, device=device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)

    def step():
        with torch.autocast(device_type=device.split(":")[0], dtype=amp, enabled=amp is not None):
            if mode == "train":
                model(x).float().logsumexp(-1).mean().backward()
                model.zero_grad(set_to_none=True)
            else:
                with torch.no_grad():
                    model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # load kernels and libraries on a tiny copy first, so the peak below is this size's activations
    tiny = timm.create_model(MODELS[model_key], img_size=32, patch_size=16, num_classes=1000).to(device)
    tiny.train(mode == "train")
    with torch.autocast(device_type=device.split(":")[0], dtype=amp, enabled=amp is not None):
        out = tiny(torch.randn(1, 3, 32, 32, device=device))
        if mode == "train":
            out.float().sum().backward()
    del tiny, out
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _rss_kb("VmRSS") * 1024
    step()  # the first full-size step: its peak is the measured one (later steps reuse freed memory)
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss_kb("VmHWM") * 1024) - base
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    tokens = model.patch_embed.num_patches + 1
    return {"model": model_key, "size": size, "mode": mode, "device": device, "batch": batch, "dtype": dtype,
            "tokens": tokens, "wall_s_per_image": statistics.median(times) / batch,
            # the compared number: CPU seconds on CPU (fair on a shared machine; all threads summed), wall on GPU
            "s_per_image": (statistics.median(times) if device.startswith("cuda") else statistics.median(cpu)) / batch,
            "peak_mb": max(peak, 0) / 2**20,
            "params": sum(p.numel() for p in model.parameters())}


def run_one(args, model_key, size, mode) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.vision", "--_one", model_key, str(size), mode, "--device", args.device,
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--dtype", args.dtype]
    # large blocks mmapped (returned to the OS on free): the resident set then follows live memory, so its peak
    # is the step's peak, not whatever malloc kept from earlier steps
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if p.returncode != 0:
        tail = (p.stderr or p.stdout).strip().splitlines()[-1:] or ["?"]
        return {"model": model_key, "size": size, "mode": mode, "error": tail[0]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def crossing(rows: list[dict], mode: str, key: str) -> int | None:
    """The smallest size from which Vim's ``key`` stays below DeiT's (None if it never does)."""
    by = {(r["model"], r["size"]): r for r in rows if r["mode"] == mode and "error" not in r}
    sizes = sorted({s for _, s in by})
    ok = [s for s in sizes if ("vim_tiny", s) in by and ("deit_tiny", s) in by]
    for i, s in enumerate(ok):
        if all(by[("vim_tiny", t)][key] < by[("deit_tiny", t)][key] for t in ok[i:]):
            return s
    return None


def table(rows: list[dict]) -> str:
    # ms: CPU milliseconds on CPU, wall on GPU
    lines = ["| mode | size | tokens | Vim-Ti ms/img | DeiT-Ti ms/img | Vim-Ti peak MB | DeiT-Ti peak MB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["size"], r["mode"]): r for r in rows}
    for mode in ("infer", "train"):
        for s in sorted({r["size"] for r in rows}):
            v, d = by.get(("vim_tiny", s, mode), {}), by.get(("deit_tiny", s, mode), {})
            if not v and not d:
                continue

            def f(r, k, scale=1.0):
                return f"{r[k] * scale:,.0f}" if k in r else ("error" if "error" in r else "-")
            tok = v.get("tokens") or d.get("tokens", "")
            lines.append(f"| {mode} | {s} | {tok} | {f(v, 's_per_image', 1e3)} | {f(d, 's_per_image', 1e3)} | "
                         f"{f(v, 'peak_mb')} | {f(d, 'peak_mb')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "s_per_image", "seconds per image (CPU time on CPU)"),
                           (axes[1], "peak_mb", "peak memory (MB)")):
        for mode, ls in (("infer", "-"), ("train", "--")):
            for model, color in (("vim_tiny", "C0"), ("deit_tiny", "C3")):
                pts = sorted((r["size"], r[key]) for r in rows if r["model"] == model and r["mode"] == mode
                             and key in r)
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", color=color, label=f"{model} {mode}")
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(label)
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 384, 512, 768, 1024])
    p.add_argument("--modes", nargs="+", default=["infer", "train"], choices=["infer", "train"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=None, help="write OUT.json, OUT.md, OUT.png")
    p.add_argument("--_one", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._one:
        m, s, mode = a._one
        print(json.dumps(measure(m, int(s), mode, a.device, a.batch, a.repeats, a.threads, a.dtype)))
        return None
    rows = []
    for mode in a.modes:
        for s in a.sizes:
            for m in a.models:
                r = run_one(a, m, s, mode)
                rows.append(r)
                msg = r.get("error") or f"{r['s_per_image'] * 1e3:,.0f} ms/img, peak {r['peak_mb']:,.0f} MB"
                print(f"{mode:5} {s:5} {m:10} {msg}", flush=True)
    md = table(rows)
    notes = []
    for mode in a.modes:
        for key, what in (("s_per_image", "faster"), ("peak_mb", "lighter")):
            c = crossing(rows, mode, key)
            notes.append(f"{mode}: Vim-Ti is {what} than DeiT-Ti " + (f"from {c} px up" if c else
                                                                        "at none of these sizes"))
    header = f"device {a.device}, batch {a.batch}, {a.threads} threads, {a.dtype}, median of {a.repeats}"
    print(f"\n{header}\n{md}\n" + "\n".join(notes))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.with_suffix(".json").write_text(json.dumps({"setup": header, "rows": rows, "notes": notes}, indent=2))
        a.out.with_suffix(".md").write_text(f"{header}\n\n{md}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
        plot(rows, a.out.with_suffix(".png"), f"Vim-Ti vs DeiT-Ti ({header})")
    return rows


if __name__ == "__main__":
    main()
