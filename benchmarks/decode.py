"""Decode speed of a whole language model: hiss's compiled whole-model step vs hiss's module step vs HF
transformers' MambaForCausalLM generate, on the same (random) weights, beside the memory-bandwidth bound.

    python -m benchmarks.decode                           # CPU, every size, fp32 + bf16 + int8 -> docs/benchmarks.md
    python -m benchmarks.decode --sizes 130m --dtypes fp32 --batches 1 --no-doc
    python -m benchmarks.decode --quick                           # tiny model, prints only (a smoke test)
    python -m benchmarks.decode --device cuda                     # GPU: module step vs HF (the compiled step is CPU)

Per-token time: greedy generation of n+1 tokens from a 16-token prompt; the n intervals between consecutive new
tokens (``stream``'s yields; HF's ``streamer.put``) are the per-token cost of generate, prompt excluded; median
over all intervals of --repeats runs, the implementations interleaved so load changes on a shared machine hit all
of them alike. tokens/s = batch / per-step time. Clock: ``--clock cpu`` (default) is this process's CPU time,
with ``--threads 1`` (default) the time the work takes on one core whatever else runs on the machine (memory
bandwidth is still shared); ``--clock wall --threads 2`` is what a user of a quiet 2-core machine sees.

Implementations: ``hiss fast`` = ``generate`` (its default: ssm_core.models.fast_decode, one compiled call per
token for all layers); ``hiss module`` = ``generate(fast=False)`` (the reference twin: ssm_core's modules, one
Python call per layer); ``HF`` = transformers' MambaForCausalLM.generate (its PyTorch path) with our tensors
assigned as its parameters (no copy).

``int8`` rows: the compiled step with int8 weight-only matrices (``generate(..., quantize="int8")``: in_proj /
out_proj / LM head int8 with fp32 per-row scales, the rest fp32; activations fp32), hiss fast only (the module path
and HF have no int8 weights); its bound counts the bytes that step streams (``FastDecoder.weight_bytes``).

``llama.cpp`` rows (Mamba-1, batch 1; benchmarks/llama_cpp.py): the same weights exported as an HF checkpoint,
converted by llama.cpp's convert_hf_to_gguf.py to F32 (beside fp32), BF16 and F16 (beside bf16), Q8_0 (beside
int8), timed by its ``llama-bench -p 0 -n 128 -t THREADS`` with the same clock (cpu: the CPU time of llama-bench
per token, from two runs differing only in token count). ``--llama-cpp auto`` (default) finds a llama-bench built
by ``bash benchmarks/build_llama_cpp.sh``; when there is none it prints that command and skips the rows.

Bound: weight bytes read per step (every parameter once, a tied head once) / a bandwidth measured in the same
run: ``copy`` = STREAM-style copy of a 512 MB buffer ((read + written bytes) / time, torch's threads).
Sizes are mamba-130m / 370m / 1.4b shaped (d_model 768 / 1024 / 2048; 24 / 48 / 48 layers; N 16; vocab 50,280).
``--mamba2`` adds a Mamba-2 130m-shaped model (headdim 64, N 128), hiss only. The ``spec`` table: cost of a
k+1-token verify call vs one step, and the speculative speed-up this predicts for a small draft at given
acceptance rates (benchmarks/speculative.py's formula; the compiled path needs no re-run after a rejection).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks._doc import write_section  # noqa: E402
from benchmarks.llama_cpp import setup as llama_cpp_setup  # noqa: E402
from ssm_core import MambaConfig, MambaLMHeadModel  # noqa: E402
from ssm_core.models.fast_decode import FastDecoder, unsupported_reason  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "benchmarks.md")
SIZES = {"130m": (768, 24), "370m": (1024, 48), "1.4b": (2048, 48)}
VOCAB = 50280
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.float32}  # int8: fp32 model, int8 matrices
QUANT = {"int8": "int8"}  # weights name -> FastDecoder's quantize=


CLOCK = time.perf_counter  # set by main: time.process_time for --clock cpu


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device="cpu") -> float:
    _sync(device)
    t0 = CLOCK()
    fn()
    _sync(device)
    return CLOCK() - t0


def bandwidth(device="cpu", mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth, GB/s of (read + written) bytes, torch's copy_ (all its threads)."""
    a = torch.empty(mb * 2**20 // 4, device=device).normal_()
    b = torch.empty_like(a)
    ts = [timed(lambda: b.copy_(a), device) for _ in range(repeats + 1)][1:]
    return 2 * a.numel() * 4 / statistics.median(ts) / 1e9


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def make_model(d_model: int, n_layer: int, layer: str, vocab: int, device) -> MambaLMHeadModel:
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab,
                      ssm_cfg={} if layer == "Mamba1" else {"layer": "Mamba2"})
    with torch.device(device):
        return MambaLMHeadModel(cfg).eval()


def hf_twin(model):
    """transformers' MambaForCausalLM whose parameters ARE model's tensors (assigned, not copied)."""
    from transformers import MambaConfig as HFConfig
    from transformers import MambaForCausalLM

    c = model.config
    hf_cfg = HFConfig(vocab_size=c.padded_vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layer,
                      state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                      residual_in_fp32=c.residual_in_fp32, layer_norm_epsilon=c.norm_epsilon,
                      tie_word_embeddings=c.tie_embeddings, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    with torch.device("meta"):
        hf = MambaForCausalLM(hf_cfg)
    sd = {("backbone.embeddings." + k[len("backbone.embedding."):] if k.startswith("backbone.embedding.") else k): v
          for k, v in model.state_dict().items()}
    hf.load_state_dict(sd, strict=False, assign=True)
    hf.tie_weights()
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"HF twin: parameters not assigned: {missing[:5]}")
    return hf.eval()


class _Stamps:
    """An HF streamer that only records when each new token arrives."""

    def __init__(self, device):
        self.t, self.device = [], device

    def put(self, value):
        _sync(self.device)
        self.t.append(CLOCK())

    def end(self):
        pass


def per_token_fns(model, hf, prompt, n, device, quantize=None):
    """name -> a function running one greedy generation of n + 1 tokens and returning the n intervals between
    consecutive new tokens (s): the per-token cost of generate, the prompt and first token left out. ``quantize``:
    the compiled step with int8 weights only."""
    fns = {}

    def hiss(fast):
        kw = {"quantize": quantize} if quantize else {}

        def run():
            stamps = []
            for _ in model.stream(prompt, n + 1, temperature=0, fast=fast, **kw):
                _sync(device)
                stamps.append(CLOCK())
            return [b - a for a, b in zip(stamps, stamps[1:])]
        return run

    def hf_run():
        st = _Stamps(device)  # put() is called with the prompt first, then once per new token
        hf.generate(prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False, pad_token_id=0, streamer=st)
        return [b - a for a, b in zip(st.t[1:], st.t[2:])]

    if unsupported_reason(model) is None:
        fns["hiss fast"] = hiss(True)
    if quantize:
        return fns
    fns["hiss module"] = hiss(False)
    if hf is not None:
        fns["HF generate"] = hf_run
    return fns


def measure(fns: dict, repeats: int, peer_repeats: int) -> dict:
    """Median per-token seconds of each implementation over all intervals of all repeats (interleaved)."""
    res: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for r in range(repeats + 1):  # round 0 warms up (allocator, oneDNN primitive caches)
            for name, fn in fns.items():
                if name.startswith("HF") and r > peer_repeats:
                    continue
                got = fn()
                if r > 0:
                    res[name].extend(got)
    return {k: statistics.median(v) for k, v in res.items()}


def spec_costs(model, k: int, repeats: int, quantize=None) -> dict:
    """Median s of one step and of a (k+1)-token verify call from a state, compiled and module paths, batch 1
    (``quantize``: the compiled path with int8 weights only)."""
    ids = torch.randint(0, 1000, (1, 16))
    out = {}
    with torch.inference_mode():
        state = model(ids, return_state=True).state
        one, many = ids[:, :1], ids[:, : k + 1]
        if unsupported_reason(model) is None:
            dec = FastDecoder(model, model(ids, return_state=True).state, quantize=quantize)
            dec.save(0)

            def fstep():
                dec.load(0)
                dec.step(one[:, 0])

            def fverify():
                dec.load(0)
                dec.forward(many, k + 1, snapshots=True)

            def fload():
                dec.load(0)
            out["fast"] = [fstep, fverify, fload]
        if not quantize:
            out["module"] = [lambda: model(one, state=state, return_state=True),
                             lambda: model(many, state=state, return_state=True, num_last_tokens=k + 1),
                             lambda: None]
        res = {}
        for name, (st, ve, ld) in out.items():
            for f in (st, ve):
                f()
            t_ld = statistics.median([timed(ld) for _ in range(repeats)])
            res[name] = (max(statistics.median([timed(st) for _ in range(repeats)]) - t_ld, 1e-9),
                         max(statistics.median([timed(ve) for _ in range(repeats)]) - t_ld, 1e-9))
    return res


def predicted_speedup(alpha: float, k: int, t_step: float, t_draft: float, t_verify: float, t_rerun: float) -> float:
    """Plain / speculative time with i.i.d. acceptance alpha: a round emits (1 - alpha^(k+1)) / (1 - alpha) tokens
    for k draft steps + one verify + (when a draft is rejected, probability 1 - alpha^k) a re-run."""
    tokens = (k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    return tokens * t_step / (k * t_draft + t_verify + (1 - alpha**k) * t_rerun)


def header(args, load: float, bw: float, device) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    if torch.device(device).type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    clock = ("process CPU time" if CLOCK is time.process_time else "wall time")
    return (f"Measured {when} on {where}, torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
            f"{platform.python_version()}; {clock}; load average {load:.1f} at the start (shared machine: compare "
            f"rows of one table, not across tables); copy bandwidth {bw:.1f} GB/s (read + written bytes / s, same "
            f"run, same threads and clock) "
            f"(`python -m benchmarks.decode {' '.join(args.argv_echo)}`).".replace(" `)", "`)"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "int8"], choices=list(DTYPES),
                   help="weights: fp32, bf16, int8 (weight-only, on the fp32 model; compiled step only)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    p.add_argument("--tokens", type=int, default=16, help="new tokens timed at batch 1 (half that above batch 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peer-repeats", type=int, default=1, help="repeats of HF generate (slow)")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--hf-max-batch", type=int, default=32)
    p.add_argument("--mamba2", action=argparse.BooleanOptionalAction, default=True,
                   help="add a Mamba-2 130m-shaped model (hiss only)")
    p.add_argument("--spec-k", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU time (robust on a shared machine; use with --threads 1); wall")
    p.add_argument("--quick", action="store_true", help="a tiny model, prints only")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--llama-cpp", default="auto", metavar="PATH|auto|off",
                   help="llama.cpp rows (Mamba-1, batch 1): path of llama-bench; auto = ~/.cache/hiss/llama_cpp "
                        "or $PATH (when none is built: prints how to build it, skips the rows); off")
    p.add_argument("--llama-cpp-tokens", type=int, default=128, help="tokens per llama-bench run")
    args = p.parse_args(argv)
    args.argv_echo = list(argv) if argv is not None else __import__("sys").argv[1:]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.decode: --device cuda but no CUDA device is available here")
    global CLOCK
    CLOCK = time.process_time if (args.clock == "cpu" and device.type == "cpu") else time.perf_counter
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    bw = bandwidth(device, 64 if args.quick else 512)
    print(f"copy bandwidth {bw:.1f} GB/s; load average {load:.1f}", flush=True)
    lc = llama_cpp_setup(args.llama_cpp if device.type == "cpu" and 1 in args.batches else "off",
                         n_gen=256 if args.quick else args.llama_cpp_tokens, reps=1 if args.quick else 3)
    cases = [(s, "Mamba1") for s in args.sizes]
    if args.mamba2 and "130m" in args.sizes:
        cases.insert(1, ("130m", "Mamba2"))
    if args.quick:
        cases, args.repeats, args.tokens = [("quick", "Mamba1"), ("quick", "Mamba2")], 1, 4
    rows, spec_rows = [], []
    for size, layer in cases:
        d_model, n_layer = (256, 4) if size == "quick" else SIZES[size]
        vocab = 1000 if size == "quick" else VOCAB
        model = make_model(d_model, n_layer, layer, vocab, device)
        if lc is not None and layer == "Mamba1":  # the fp32 weights, before any dtype change
            lc.export(hf_twin(model), size)
        # bf16 last: .to(bfloat16) rounds the weights, and int8 must quantise the fp32 originals
        for dname in sorted(args.dtypes, key=lambda d: d == "bf16"):
            model = model.to(DTYPES[dname])
            gc.collect()
            quant = QUANT.get(dname)
            if quant and unsupported_reason(model) is not None:
                print(f"{size} {layer} {dname}: skipped ({unsupported_reason(model)})", flush=True)
                continue
            nbytes = (FastDecoder(model, model.empty_state(1), quantize=quant).weight_bytes if quant
                      else weight_bytes(model))
            bound = nbytes / (bw * 1e9)
            for batch in args.batches:
                use_hf = (not args.no_hf and layer == "Mamba1" and batch <= args.hf_max_batch and not quant)
                hf = hf_twin(model) if use_hf else None
                prompt = torch.randint(0, vocab, (batch, 16), generator=torch.Generator().manual_seed(batch)).to(device)
                n = args.tokens if batch <= 8 else max(2, args.tokens // 2)
                res = measure(per_token_fns(model, hf, prompt, n, device, quant), args.repeats, args.peer_repeats)
                for impl, t in res.items():
                    row = (f"{size} {layer}", dname, batch, impl, t, batch / t, t / bound, nbytes)
                    rows.append(row)
                    print(f"{row[0]:14s} {dname} batch {batch:3d} {impl:12s} {t * 1e3:9.2f} ms/step "
                          f"{batch / t:9.1f} tokens/s  {t / bound:5.2f}x bound ({bound * 1e3:.1f} ms)", flush=True)
                del hf
                gc.collect()
                if lc is not None and layer == "Mamba1" and batch == 1:  # right after hiss, same weights
                    rows += lc.rows(f"{size} {layer}", dname, args.threads, args.clock, bw)
            if device.type == "cpu" and 1 in args.batches and layer == "Mamba1":
                costs = spec_costs(model, args.spec_k, max(5, args.repeats), quant)
                spec_rows.append((f"{size} {layer}", dname, costs))
                print(f"{size} {dname} spec costs (step, verify k+1={args.spec_k + 1}) s: {costs}", flush=True)
        del model
        gc.collect()
    head = header(args, load, bw, device)
    if lc is not None:
        head += "\n\n" + lc.note(args.threads, args.clock)
        lc.close()
    body = render(rows, spec_rows, args, head)
    print(body)
    if not (args.quick or args.no_doc):
        key = "decode" if device.type == "cpu" else "decode_gpu"
        title = "Whole-model decode, CPU" if device.type == "cpu" else "Whole-model decode, GPU"
        write_section(Path(DOC), key, f"## {title}\n\n{body}")
        print(f"wrote {DOC} ({key})")
    return rows, spec_rows


def render(rows, spec_rows, args, head: str) -> str:
    out = [head, "",
           "Random weights, greedy, 16-token prompt; ms per step = median interval between consecutive new tokens of "
           "a generation (one token for every row of the batch; sampling included), tokens/s = batch / step time; "
           "bound = weight bytes per step / copy bandwidth; x bound = step time / bound. int8 = int8 weight-only "
           "matrices (in_proj / out_proj / LM head, per-row fp32 scales) on the fp32 model, compiled step only; its "
           "bound counts the int8 bytes.", "",
           "| model | weights | batch | implementation | ms / step | tokens/s | x bound | bound ms (MB / step) |",
           "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for model, dname, batch, impl, t, tps, xb, nbytes in rows:
        out.append(f"| {model} | {dname} | {batch} | {impl} | {t * 1e3:.2f} | {tps:,.1f} | {xb:.2f} | "
                   f"{t / xb * 1e3:.1f} ({nbytes / 1e6:,.0f}) |")
    if spec_rows:
        k = args.spec_k
        out += ["", f"Speculative decoding, batch 1: one step vs one verify call of k+1 = {k + 1} tokens from a state "
                "(medians), and the speed-up over plain decoding this predicts with a draft costing 1/10 of a target "
                "step at i.i.d. acceptance rate a (predicted, not measured end to end: random weights have no "
                "meaningful acceptance). The compiled path restores a snapshot after a rejection; the module path "
                "re-runs the accepted tokens (about one verify).", "",
                "| model | weights | path | step ms | verify ms | verify / step | speed-up a=0.6 | a=0.8 | a=0.9 |",
                "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for model, dname, costs in spec_rows:
            for path, (ts, tv) in costs.items():
                rerun = 0.0 if path == "fast" else tv
                ups = [predicted_speedup(a, k, ts, ts / 10, tv, rerun) for a in (0.6, 0.8, 0.9)]
                out.append(f"| {model} | {dname} | {path} | {ts * 1e3:.2f} | {tv * 1e3:.2f} | {tv / ts:.2f} | "
                           + " | ".join(f"{u:.2f}x" for u in ups) + " |")
    return "\n".join(out)


from pathlib import Path  # noqa: E402

if __name__ == "__main__":
    main()
