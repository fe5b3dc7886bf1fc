"""Markdown tables and plots from the committed train.json / eval.json records (docs/paper_results.md)."""

from __future__ import annotations

import math
from pathlib import Path

from ssm_core import atomic_write

from .records import CHECKPOINTS, load_records
from .tasks import N_DATA, TASKS
from .train import SPECS

__all__ = ["IMG", "report", "plot_curves", "plot_extrapolation"]

IMG = Path(__file__).resolve().parents[2] / "docs" / "img"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    _pyplot().close(fig)


def plot_curves(train_rec: dict, task: str, path: Path) -> None:
    """Training loss and held-out accuracy at the training length against steps, one line per model."""
    fig, (ax_loss, ax_acc) = _pyplot().subplots(1, 2, figsize=(10, 3.6))
    for rec in train_rec.values():
        if rec["task"] != task:
            continue
        steps = [c["step"] for c in rec["curve"]]
        ax_loss.plot(steps, [c["loss"] for c in rec["curve"]], label=rec["model"])
        ax_acc.plot(steps, [c["val_acc"] for c in rec["curve"]], label=rec["model"])
    ax_loss.set(xlabel="step", ylabel="train loss (nats)", yscale="log", title=f"{task}: training loss")
    ax_acc.set(xlabel="step", ylabel="held-out accuracy", ylim=(0, 1.02), title=f"{task}: accuracy at train length")
    ax_acc.legend()
    fig.tight_layout()
    _save(fig, path)


def plot_extrapolation(eval_rec: dict, path: Path, train_L: int) -> None:
    """Induction-heads accuracy against test length (log 2 axis), one line per model."""
    fig, ax = _pyplot().subplots(figsize=(6.5, 3.6))
    for rec in eval_rec.values():
        if rec["task"] != "induction":
            continue
        ax.plot([r["L"] for r in rec["results"]], [r["acc"] for r in rec["results"]], marker="o", label=rec["model"])
    ax.axvline(train_L, color="grey", linestyle=":", label="train length")
    ax.set(xscale="log", xlabel="test sequence length", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="Induction heads: length extrapolation")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def report(root: Path = CHECKPOINTS, img: Path = IMG) -> str:
    """Markdown tables from the committed train.json / eval.json files; writes the PNGs to docs/img."""
    train_rec, eval_rec = load_records(root)
    lines = ["| task | model | params | seed | curriculum | steps | wall (min) | held-out acc at the last length |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | ---: |"]
    for rec in train_rec.values():
        steps, wall, prev = rec["steps"], rec["wall_s"], rec.get("previous")
        while prev:  # continued runs (--init): count every leg
            steps, wall, prev = steps + prev["steps"], wall + prev["wall_s"], prev.get("previous")
        reached = "" if rec.get("reached_L", rec["L"]) == rec["L"] else f" (stopped at {rec['reached_L']})"
        lines.append(f"| {rec['task']} | {rec['model']} | {rec['params']:,} | {rec['seed']} | "
                     f"{' → '.join(map(str, rec.get('curriculum', [rec['L']])))}{reached} | {steps} | "
                     f"{wall / 60:.1f} | {100 * rec['final_val_acc']:.1f}% |")
    ind = {k: v for k, v in eval_rec.items() if v["task"] == "induction"}
    if ind:
        lengths = sorted({r["L"] for v in ind.values() for r in v["results"]})
        lines += ["", "| model | " + " | ".join(f"2^{int(math.log2(L))}" for L in lengths) + " |",
                  "| --- |" + " ---: |" * len(lengths)]
        for v in ind.values():
            acc = {r["L"]: r for r in v["results"]}
            cells = [f"{100 * acc[L]['acc']:.1f} ({acc[L]['n_seq']})" if L in acc else "-" for L in lengths]
            lines.append(f"| {v['model']} | " + " | ".join(cells) + " |")
    cop = {k: v for k, v in eval_rec.items() if v["task"] == "copying"}
    if cop:
        lines += ["", "| model | L (noise) | accuracy | data tokens scored |", "| --- | ---: | ---: | ---: |"]
        for v in cop.values():
            for r in v["results"]:
                lines.append(f"| {v['model']} | {r['L']} | {100 * r['acc']:.2f}% | {r['n_seq'] * N_DATA} |")
    if train_rec:
        for task in TASKS:
            if any(r["task"] == task for r in train_rec.values()):
                plot_curves(train_rec, task, img / f"synthetic_{task}_curves.png")
    if ind:
        plot_extrapolation(ind, img / "synthetic_induction_extrapolation.png", SPECS["induction"].L)
    return "\n".join(lines)
