"""``python -m experiments.synthetic train|eval|report|selectivity``: the command line (see the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import experiments.synthetic as package
from ssm_core import MambaLMHeadModel

from .evaluate import default_lengths, evaluate, save_result
from .mechanism import delta_selectivity, floor_accuracy
from .model import MODELS, STAGE_ACC
from .records import checkpoint_dir
from .report import report
from .tasks import TASKS
from .train import SPECS, TrainSpec, train


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m experiments.synthetic", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    # train: a flag left unset is None and keeps the task's recipe (train.SPECS), defaults included
    for name in ("train", "eval"):
        p = sub.add_parser(name)
        p.add_argument("--task", choices=TASKS, required=True)
        p.add_argument("--model", choices=MODELS, required=True)
        p.add_argument("--ckpt", type=Path,
                       help="checkpoint directory (default experiments/synthetic/checkpoints/TASK_MODEL)")
        p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    tr = sub.choices["train"]
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--L", type=int, help="training length (copying: noise length)")
    tr.add_argument("--warmup-lengths", type=int, nargs="*", help="length curriculum before L (default per task)")
    tr.add_argument("--batch", type=int)
    tr.add_argument("--steps", type=int, help="maximum optimizer steps")
    tr.add_argument("--lr", type=float)
    tr.add_argument("--adam-eps", type=float,
                    help="AdamW eps (default 1e-8); below the gradient scale of a near-zero loss, updates keep "
                         "their size")
    tr.add_argument("--cosine", action="store_true", default=None,
                    help="lr decays to 0 by a cosine over --steps after the warm-up (default: constant)")
    tr.add_argument("--delta-l1", type=float,
                    help="weight of an L1 penalty on the mean step size Δ of the Mamba-1 and Mamba-2 layers "
                         "(default per task)")
    tr.add_argument("--delta-log", type=float, help="weight of a penalty on mean log Δ (default off)")
    tr.add_argument("--weight-decay", type=float, help="AdamW decay on matrices (default per task)")
    tr.add_argument("--monitor-lengths", type=int, nargs="*",
                    help="also log held-out accuracy at these (longer) lengths; logged only, never used to stop")
    tr.add_argument("--monitor-every", type=int, help="steps between monitor evaluations (default 500)")
    tr.add_argument("--eval-every", type=int, help="steps between held-out checks at the training length")
    tr.add_argument("--stop-acc", type=float, help="stop after 2 held-out checks in a row at it (default 1.0)")
    tr.add_argument("--stage-acc", type=float,
                    help=f"held-out accuracy (2 checks in a row) that ends a curriculum stage (default {STAGE_ACC})")
    tr.add_argument("--max-minutes", type=float, help="wall-clock cap")
    tr.add_argument("--init", type=Path, help="continue from this checkpoint directory (weights)")
    tr.add_argument("--min-final-steps", type=int, help="at least this many steps at L (default per task)")
    ev = sub.choices["eval"]
    ev.add_argument("--lengths", type=int, nargs="+",
                    help="default: 2^6..2^20 (induction), the training L (copying)")
    ev.add_argument("--max-len", type=int, help="skip lengths above this (attention is quadratic)")
    ev.add_argument("--n-max", type=int, default=512, help="sequences per length at short lengths")
    ev.add_argument("--n-min", type=int, default=8, help="sequences per length at the longest lengths")
    ev.add_argument("--budget-tokens", type=int, default=2**20, help="about this many tokens per length")
    ev.add_argument("--chunk-len", type=int, default=8192, help="tokens per piece (state carried across)")
    sub.add_parser("report", help="print the markdown tables and write docs/img/synthetic_*.png")
    se = sub.add_parser("selectivity", help="per layer: Δ at write positions vs elsewhere (Mamba-1 checkpoints)")
    se.add_argument("--task", choices=TASKS, required=True)
    se.add_argument("--ckpt", type=Path, required=True)
    se.add_argument("--L", type=int, default=256)
    se.add_argument("--floor", type=float, help="also: accuracy at --lengths with every Δ below this set to 0")
    se.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    se.add_argument("--n", type=int, default=64, help="sequences per length for --floor")
    return ap


def train_spec(args: argparse.Namespace) -> TrainSpec:
    """The recipe a ``train`` command line asks for: the task's SPECS entry with the flags given."""
    return SPECS[args.task].override(
        L=args.L, warmup_lengths=args.warmup_lengths, batch=args.batch, max_steps=args.steps, lr=args.lr,
        eval_every=args.eval_every, min_final_steps=args.min_final_steps, weight_decay=args.weight_decay,
        delta_l1=args.delta_l1, delta_log=args.delta_log, adam_eps=args.adam_eps, stop_acc=args.stop_acc,
        stage_acc=args.stage_acc, cosine=args.cosine, monitor_lengths=args.monitor_lengths,
        monitor_every=args.monitor_every)


def selectivity(args: argparse.Namespace) -> None:
    model = MambaLMHeadModel.from_pretrained(args.ckpt).eval()
    for r in delta_selectivity(model, args.task, args.L):
        print(f"layer {r['layer']}: channel {r['channel']:>3}  Δ at writes {r['delta_write']:.3g}  "
              f"elsewhere {r['delta_other']:.3g}  horizon {r['horizon']:.3g} tokens")
    for L in args.lengths if args.floor else []:
        plain, floored = floor_accuracy(model, args.task, L, args.n, args.floor)
        print(f"L={L}: accuracy {plain:.3f}; with every Δ < {args.floor:g} set to 0: {floored:.3f} ({args.n} seqs)")


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.cmd == "report":
        print(report())
        return
    if args.cmd == "selectivity":
        selectivity(args)
        return
    torch.set_num_threads(args.threads)
    ckpt = args.ckpt or checkpoint_dir(args.task, args.model)
    if args.cmd == "train":
        rec = train(args.task, args.model, train_spec(args), seed=args.seed, out=ckpt, init=args.init,
                    max_minutes=args.max_minutes)
        print(f"{args.task}/{args.model}: {rec['steps']} steps, {rec['wall_s']} s, held-out acc "
              f"{rec['final_val_acc']:.4f} -> {ckpt}")
        return
    lengths = args.lengths or default_lengths(args.task, ckpt)
    lengths = [L for L in lengths if args.max_len is None or L <= args.max_len]
    path = ckpt / "eval.json"
    evaluate(args.task, args.model, lengths, ckpt, n_max=args.n_max, n_min=args.n_min,
             budget_tokens=args.budget_tokens, chunk_len=args.chunk_len,
             on_result=lambda row: save_result(path, args.task, args.model, args.chunk_len, row))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
