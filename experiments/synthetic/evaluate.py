"""Accuracy of a trained checkpoint at each test length, reading long sequences in pieces with the state carried.

Sequences come from a generator seeded with EVAL_SEED + L, so results are reproducible and never overlap the
training stream; ``eval.json`` keeps one row per length (later runs replace the lengths they redo).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ssm_core import MambaLMHeadModel

from .records import checkpoint_dir, write_json
from .tasks import EVAL_SEED, MAKE_BATCH, N_DATA, N_TARGETS, VOCAB

__all__ = ["last_logits", "correct", "n_eval_sequences", "evaluate", "default_lengths", "save_result"]


@torch.no_grad()
def last_logits(model: MambaLMHeadModel, ids: Tensor, K: int, chunk_len: int) -> Tensor:
    """Logits of the last K positions, reading ids in pieces of chunk_len with the state carried across:
    memory is one piece's activations (plus the key/value cache for attention)."""
    T = ids.shape[1]
    starts = list(range(0, T, chunk_len))
    if len(starts) > 1 and T - starts[-1] < K:  # the last piece must hold all K target positions
        starts.pop()
    state, logits = None, None
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else T
        out = model(ids[:, s:e], state=state, return_state=True, num_last_tokens=K)
        state, logits = out.state, out.logits
    return logits[..., :VOCAB]


def correct(model: MambaLMHeadModel, ids: Tensor, targets: Tensor, chunk_len: int) -> int:
    """How many of targets (batch, K) the model's last K positions predict (argmax), reading in pieces."""
    return int((last_logits(model, ids, targets.shape[1], chunk_len).argmax(-1) == targets).sum())


def n_eval_sequences(T: int, budget_tokens: int, n_max: int, n_min: int) -> int:
    """Fewer sequences at long lengths: the cost is sequences x tokens."""
    return int(max(n_min, min(n_max, budget_tokens // T)))


def evaluate(task: str, model_name: str, lengths: list[int], ckpt: Path | None = None, n_max: int = 512,
             n_min: int = 8, budget_tokens: int = 2**20, batch_tokens: int = 2**16, chunk_len: int = 8192,
             progress: bool = True, on_result: Callable[[dict], None] | None = None) -> dict:
    """Accuracy of a checkpoint at each length (L is the full length for induction, the noise length for
    copying). Sequences come from a generator seeded with EVAL_SEED + L, so results are reproducible.
    ``on_result(row)`` is called after each length (e.g. ``save_result``: the long ones take minutes)."""
    ckpt = Path(ckpt) if ckpt else checkpoint_dir(task, model_name)
    model = MambaLMHeadModel.from_pretrained(ckpt).eval()
    K = N_TARGETS[task]
    results = []
    for L in lengths:
        T = L + (N_DATA if task == "copying" else 0)
        n = n_eval_sequences(T, budget_tokens, n_max, n_min)
        gen = torch.Generator().manual_seed(EVAL_SEED + L)
        per_batch = max(1, min(n, batch_tokens // T))
        hits = total = 0
        t0 = time.perf_counter()
        bar = tqdm(total=n, desc=f"{task}/{model_name} L={L}", disable=not progress, leave=False)
        while total < n * K:
            b = min(per_batch, n - total // K)
            ids, targets = MAKE_BATCH[task](b, L, gen)
            hits += correct(model, ids, targets, chunk_len)
            total += targets.numel()
            bar.update(b)
        bar.close()
        row = {"L": L, "n_seq": n, "acc": hits / total, "time_s": round(time.perf_counter() - t0, 1)}
        results.append(row)
        if on_result is not None:
            on_result(row)
        if progress:
            print(f"{task}/{model_name} L={L:>8}: acc {row['acc']:.4f} on {n} sequences ({row['time_s']} s)",
                  flush=True)
    return {"task": task, "model": model_name, "eval_seed": EVAL_SEED, "chunk_len": chunk_len, "results": results}


def default_lengths(task: str, ckpt: Path) -> list[int]:
    """2^6 .. 2^20 for induction (length extrapolation); the training L (from train.json) for copying."""
    if task == "induction":
        return [2**k for k in range(6, 21)]
    return [json.loads((Path(ckpt) / "train.json").read_text())["L"]]


def save_result(path: Path, task: str, model_name: str, chunk_len: int, row: dict) -> None:
    """Merge one length's row into eval.json: lengths evaluated earlier and not redone are kept."""
    rec = json.loads(path.read_text()) if path.exists() else {
        "task": task, "model": model_name, "eval_seed": EVAL_SEED, "chunk_len": chunk_len, "results": []}
    old = {r["L"]: r for r in rec["results"]}
    old[row["L"]] = row
    rec["results"] = [old[L] for L in sorted(old)]
    write_json(path, rec)
