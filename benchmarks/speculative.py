"""Plain vs speculative byte generation, side by side in one process:

    python -m benchmarks.speculative                    # the shipped pair: apps/text/assets/byte_mamba{,_draft}
    python -m benchmarks.speculative --target runs/text/pretrained --draft runs/text_draft/pretrained
        --k 2 4 6 --bytes 256 --repeats 5

For each prompt (slices of the held-out sample files) and repeat, the same seed is generated plainly and
speculatively, interleaved so load changes on a shared machine hit both alike; medians are reported.
``--sizes`` also times single steps and k+1-token verify passes of random-weight targets of larger sizes,
which is where the break-even lies (acceptance measured with the trained pair is then assumed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from apps.text.data import SAMPLE_DIR, list_files, split_files
from apps.text.generate import SHIPPED, SHIPPED_DRAFT, load_model, stream_bytes
from ssm_core import MambaConfig, MambaLMHeadModel, SpecStats

__all__ = ["main", "time_costs", "predicted_speedup"]


def prompts_from_sample(n: int, length: int = 256) -> list[bytes]:
    _, _, test = split_files(list_files([SAMPLE_DIR], "*.rst.txt"), roots=[SAMPLE_DIR])
    data = b"".join(f.read_bytes() for f in test)
    step = max(1, (len(data) - length) // n)
    return [data[i * step : i * step + length] for i in range(n)]


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


@torch.inference_mode()
def time_costs(model, k: int, repeats: int = 20) -> dict[str, float]:
    """Median seconds of one decode step and of one (k+1)-token forward from a state (the verify pass)."""
    ids = torch.randint(0, 256, (1, 64))
    state = model(ids, return_state=True).state
    one, many = ids[:, :1], ids[:, : k + 1]
    step, verify = [], []
    for _ in range(repeats):
        step.append(timed(lambda: model(one, state=state, return_state=True))[0])
        verify.append(timed(lambda: model(many, state=state, return_state=True, num_last_tokens=k + 1))[0])
    return {"step_s": statistics.median(step), "verify_s": statistics.median(verify)}


def predicted_speedup(alpha: float, k: int, t_step: float, t_draft: float, t_verify: float) -> float:
    """Expected plain/speculative time ratio with i.i.d. acceptance ``alpha``: a round emits
    (1 - alpha^(k+1)) / (1 - alpha) tokens and costs k draft steps + one verify + (if any draft was
    rejected, probability 1 - alpha^k) one re-run of about a verify's cost."""
    tokens = (k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
    cost = k * t_draft + t_verify + (1 - alpha**k) * t_verify
    return tokens * t_step / cost


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(SHIPPED))
    p.add_argument("--draft", default=str(SHIPPED_DRAFT))
    p.add_argument("--k", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--bytes", type=int, default=256)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--sizes", type=str, nargs="*", default=["256x8", "512x16", "1024x24"],
                   help="d_modelxn_layer of random-weight targets to time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/text_bench/speculative.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    target, draft = load_model(a.target), load_model(a.draft)
    n_params = {name: sum(t.numel() for t in m.parameters()) for name, m in (("target", target), ("draft", draft))}
    prompts = prompts_from_sample(a.prompts)
    plain_rates, spec = [], {k: {"rates": [], "stats": SpecStats()} for k in a.k}

    def rate(prompt: bytes, seed: int, **kw) -> float:
        dt, out = timed(lambda: list(stream_bytes(target, prompt, a.bytes, temperature=a.temperature,
                                                  top_p=a.top_p, seed=seed, **kw)))
        return len(out) / dt

    for r in range(a.repeats):
        for i, prompt in enumerate(prompts):
            plain_rates.append(rate(prompt, 1000 * r + i))
            for k in a.k:
                spec[k]["rates"].append(rate(prompt, 1000 * r + i, draft=draft, k=k, stats=spec[k]["stats"]))
    plain = statistics.median(plain_rates)
    costs_t = time_costs(target, max(a.k))
    costs_d = time_costs(draft, 1)
    result = {"target_params": n_params["target"], "draft_params": n_params["draft"], "bytes": a.bytes,
              "threads": a.threads, "plain_bytes_per_s": plain, "target_step_s": costs_t["step_s"],
              "draft_step_s": costs_d["step_s"], "speculative": {}}
    print(f"target {n_params['target']:,} params, draft {n_params['draft']:,}; plain {plain:.1f} bytes/s "
          f"(step {costs_t['step_s'] * 1e3:.2f} ms, draft step {costs_d['step_s'] * 1e3:.2f} ms)")
    for k in a.k:
        st, rate = spec[k]["stats"], statistics.median(spec[k]["rates"])
        result["speculative"][k] = {"bytes_per_s": rate, "speedup": rate / plain, "acceptance": st.acceptance_rate,
                                    "bytes_per_target_call": st.emitted / max(st.target_calls, 1)}
        print(f"k={k}: {rate:.1f} bytes/s = {rate / plain:.2f}x plain; acceptance {st.acceptance_rate:.2f}, "
              f"{st.emitted / max(st.target_calls, 1):.2f} bytes per target forward")
    # where it pays: bigger targets, same draft, acceptance as measured with the trained pair
    k_best = max(a.k, key=lambda k: result["speculative"][k]["speedup"])
    alpha = result["speculative"][k_best]["acceptance"]
    result["sizes"] = {}
    for size in a.sizes:
        d, n = map(int, size.split("x"))
        big = MambaLMHeadModel(MambaConfig(d_model=d, n_layer=n, vocab_size=256)).eval()
        c = time_costs(big, k_best, repeats=10)
        pred = predicted_speedup(alpha, k_best, c["step_s"], costs_d["step_s"], c["verify_s"])
        result["sizes"][size] = {"params": sum(t.numel() for t in big.parameters()), **c, "k": k_best,
                                 "alpha": alpha, "predicted_speedup": pred}
        print(f"target {size} ({result['sizes'][size]['params'] / 1e6:.1f}M): step {c['step_s'] * 1e3:.1f} ms, "
              f"verify of {k_best + 1} {c['verify_s'] * 1e3:.1f} ms -> predicted {pred:.2f}x at acceptance {alpha:.2f}")
        del big
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
