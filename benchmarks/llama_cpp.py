"""llama.cpp beside hiss in ``python -m benchmarks.decode``: the same (random) weights, exported as an HF
MambaForCausalLM checkpoint, converted to GGUF by llama.cpp's own ``convert_hf_to_gguf.py`` and timed with its
``llama-bench`` (text generation, batch 1: ``-p 0 -n N``).

Nothing here builds llama.cpp: ``bash benchmarks/build_llama_cpp.sh`` does (once, ~/.cache/hiss/llama_cpp).
When no llama-bench is found, :func:`setup` prints that command and the decode benchmark skips the rows.

Per-token time, like the hiss rows: ``--clock cpu`` = CPU time of the llama-bench process per generated token,
the difference between two runs that differ only in the number of generated tokens (model load, warm-up and
context set-up cancel); ``--clock wall`` = llama-bench's own median wall time of a run / tokens.
"""

from __future__ import annotations

import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "benchmarks" / "build_llama_cpp.sh"
CACHE = Path(os.environ.get("HISS_LLAMA_CPP_DIR", "~/.cache/hiss/llama_cpp")).expanduser()
# hiss weights -> the GGUF types compared with them (llama.cpp's usual half type is F16; BF16 is hiss's)
_which = shutil.which  # tests replace it
GGUF_TYPES = {"fp32": ["f32"], "bf16": ["bf16", "f16"], "int8": ["q8_0"]}


def build_hint(why: str | None = None) -> str:
    why = why or f"no llama-bench found (looked in $HISS_LLAMA_BENCH, {CACHE} and $PATH)"
    return (f"llama.cpp rows skipped: {why}. Build it once (CPU only, "
            f"~/.cache/hiss/llama_cpp, about 30 min of one core on a shared 2-core box) with\n"
            f"    bash {os.path.relpath(BUILD_SCRIPT)}\n"
            f"then re-run, or pass --llama-cpp PATH/TO/llama-bench (--llama-cpp off silences this).")


def find_llama_bench(spec: str | None = "auto") -> Path | None:
    """An explicit path (None when it is not an executable file), or for 'auto': $HISS_LLAMA_BENCH,
    ~/.cache/hiss/llama_cpp/**/build/bin/llama-bench, then llama-bench on $PATH."""
    if spec in (None, "off", "none"):
        return None
    if spec != "auto":
        p = Path(spec).expanduser()
        return p if p.is_file() and os.access(p, os.X_OK) else None
    cands = [os.environ.get("HISS_LLAMA_BENCH", "")]
    cands += sorted(glob.glob(str(CACHE / "**" / "build" / "bin" / "llama-bench"), recursive=True))
    cands.append(_which("llama-bench") or "")
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return Path(c)
    return None


def find_converter(bench: Path | None = None) -> Path | None:
    """llama.cpp's convert_hf_to_gguf.py (it needs its source tree: conversion/, gguf-py/, models/): the tree
    llama-bench was built from (build/bin/llama-bench -> ../../), $HISS_LLAMA_CPP_SRC, or one under the cache."""
    cands = []
    if bench is not None:
        cands.append(Path(bench).resolve().parent.parent.parent)
    if os.environ.get("HISS_LLAMA_CPP_SRC"):
        cands.append(Path(os.environ["HISS_LLAMA_CPP_SRC"]).expanduser())
    cands += [Path(p).parent for p in sorted(glob.glob(str(CACHE / "**" / "convert_hf_to_gguf.py"), recursive=True))]
    for c in cands:
        if (c / "convert_hf_to_gguf.py").is_file() and (c / "gguf-py").is_dir():
            return c / "convert_hf_to_gguf.py"
    return None


def export_hf(hf_model, directory) -> Path:
    """Write an HF MambaForCausalLM (benchmarks.decode.hf_twin) as a checkpoint directory. No tokenizer: the
    converter then takes llama.cpp's bundled GPT-NeoX vocabulary (models/ggml-vocab-gpt-neox.gguf), the
    tokenizer of the state-spaces Mamba models, cut to the model's vocabulary size."""
    directory = Path(directory)
    hf_model.save_pretrained(directory)
    return directory


def convert(converter: Path, hf_dir, outtype: str, outfile) -> Path:
    """hf_dir -> a GGUF file of outtype (f32, f16, bf16, q8_0), with llama.cpp's converter in a subprocess."""
    cmd = [sys.executable, str(converter), str(hf_dir), "--outtype", outtype, "--outfile", str(outfile)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0 or not Path(outfile).is_file():
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({' '.join(cmd)}):\n{tail}")
    return Path(outfile)


def gguf_tensors(converter: Path, path) -> dict:
    """name -> (type name, shape, bytes) of a GGUF file, read with the gguf-py next to the converter."""
    gguf_py = str(Path(converter).parent / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    r = gguf.GGUFReader(str(path), "r")
    return {t.name: (t.tensor_type.name, tuple(int(s) for s in t.shape), int(t.n_bytes)) for t in r.tensors}


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_bench(bench: Path, gguf_path, threads: int, n_gen: int, reps: int) -> tuple[dict, float]:
    """One llama-bench text-generation run: (its JSON record, CPU seconds the process used)."""
    cmd = [str(bench), "-m", str(gguf_path), "-p", "0", "-n", str(n_gen), "-t", str(threads), "-r", str(reps),
           "-o", "json"]
    c0 = _child_cpu()
    r = subprocess.run(cmd, capture_output=True, text=True)
    cpu = _child_cpu() - c0
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"llama-bench failed ({' '.join(cmd)}):\n{tail}")
    return json.loads(r.stdout)[0], cpu


def bench_version(bench: Path) -> str:
    r = subprocess.run([str(bench), "--version"], capture_output=True, text=True)
    text = (r.stdout + r.stderr).strip().splitlines()
    return "; ".join(text[:2]) if text else "unknown version"


class LlamaCpp:
    """Exports, converts and times one model at a time in a temporary folder (removed by close())."""

    def __init__(self, bench: Path, converter: Path, n_gen: int = 128, reps: int = 3, n_base: int = 8):
        self.bench, self.converter = Path(bench), Path(converter)
        self.n_gen, self.reps, self.n_base = n_gen, reps, n_base
        self.tmp = tempfile.TemporaryDirectory(prefix="hiss-llama-cpp-")
        self.version = bench_version(self.bench)
        self.hf_dir: Path | None = None

    def export(self, hf_model, tag: str) -> None:
        if self.hf_dir is not None:
            shutil.rmtree(self.hf_dir, ignore_errors=True)
        self.hf_dir = export_hf(hf_model, Path(self.tmp.name) / f"hf-{tag}")

    def measure(self, outtype: str, threads: int, clock: str) -> dict:
        """Per-token seconds (by ``clock``: 'cpu' or 'wall') of llama-bench on the exported model as outtype,
        plus both readings and the GGUF's tensor bytes."""
        gguf_path = convert(self.converter, self.hf_dir, outtype, Path(self.tmp.name) / f"model-{outtype}.gguf")
        try:
            nbytes = sum(b for _, _, b in gguf_tensors(self.converter, gguf_path).values())
            _, cpu_short = run_bench(self.bench, gguf_path, threads, self.n_base, self.reps)
            rec, cpu_long = run_bench(self.bench, gguf_path, threads, self.n_base + self.n_gen, self.reps)
        finally:
            gguf_path.unlink(missing_ok=True)
        cpu = (cpu_long - cpu_short) / (self.n_gen * self.reps)
        wall = statistics.median(rec["samples_ns"]) / 1e9 / (self.n_base + self.n_gen)
        return {"t": cpu if clock == "cpu" else wall, "cpu": cpu, "wall": wall, "bytes": nbytes}

    def rows(self, model_name: str, dname: str, threads: int, clock: str, bw: float) -> list[tuple]:
        """benchmarks.decode rows (model, weights, batch, implementation, s/step, tokens/s, x bound, bytes) of
        the GGUF types compared with hiss's ``dname`` weights; a failure is printed and gives no rows."""
        out = []
        if self.hf_dir is None:
            return out
        for outtype in GGUF_TYPES.get(dname, []):
            try:
                m = self.measure(outtype, threads, clock)
            except (RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
                print(f"{model_name} llama.cpp {outtype}: skipped ({type(e).__name__}: {e})", flush=True)
                continue
            t, bound = m["t"], m["bytes"] / (bw * 1e9)
            if t <= 0:  # a CPU-time difference swamped by load-time noise (tiny models, few tokens)
                print(f"{model_name} llama.cpp {outtype}: skipped (CPU time difference {t * 1e3:.2f} ms/token: too "
                      f"few tokens for this model; raise --llama-cpp-tokens)", flush=True)
                continue
            row = (model_name, f"{outtype.upper()} (GGUF)", 1, f"llama.cpp t={threads}", t, 1 / t, t / bound,
                   m["bytes"])
            out.append(row)
            print(f"{model_name:14s} {outtype.upper():5s} batch   1 llama.cpp t={threads} {t * 1e3:9.2f} ms/step "
                  f"{1 / t:9.1f} tokens/s  {t / bound:5.2f}x bound ({bound * 1e3:.1f} ms); CPU {m['cpu'] * 1e3:.2f}"
                  f" ms, wall {m['wall'] * 1e3:.2f} ms per token", flush=True)
        return out

    def note(self, threads: int, clock: str) -> str:
        how = ("CPU time of the llama-bench process per token: (run with 8 + {n} generated tokens - run with 8) / "
               "({n} x {r} repetitions), so model load and warm-up cancel" if clock == "cpu" else
               "llama-bench's median wall time of a run of 8 + {n} tokens / tokens").format(n=self.n_gen, r=self.reps)
        return (f"llama.cpp rows: `llama-bench -p 0 -n N -t {threads}` ({self.version}), text generation at batch 1 "
                f"(random next tokens, logits of the whole vocabulary each step, no sampling), on the same weights "
                f"exported as an HF MambaForCausalLM checkpoint and converted by llama.cpp's convert_hf_to_gguf.py "
                f"(`--outtype f32 / bf16 / f16 / q8_0`; conv, A, D, norms and dt bias stay F32); ms / step = {how}; "
                f"bound = GGUF tensor bytes / copy bandwidth.")

    def close(self) -> None:
        self.tmp.cleanup()


def setup(spec: str | None, n_gen: int = 128, reps: int = 3) -> LlamaCpp | None:
    """A LlamaCpp for --llama-cpp spec ('auto', a path, 'off'), or None after printing why and how to build."""
    if spec in (None, "off", "none"):
        return None
    bench = find_llama_bench(spec)
    if bench is None:
        print(build_hint(None if spec == "auto" else f"--llama-cpp {spec}: not an executable file"), flush=True)
        return None
    converter = find_converter(bench)
    if converter is None:
        print(f"llama.cpp rows skipped: found {bench} but not convert_hf_to_gguf.py in its source tree (set "
              f"HISS_LLAMA_CPP_SRC to the llama.cpp folder holding it)", flush=True)
        return None
    return LlamaCpp(bench, converter, n_gen=n_gen, reps=reps)
