"""Fine-tune a DNA backbone + classification head (LightningCLI): ``python -m apps.genomics.finetune``.

    python -m apps.genomics.finetune                                     # splice junctions, BiMamba, ~4 min CPU
    python -m apps.genomics.finetune --config apps/genomics/configs/finetune_genus.yaml
    python -m apps.genomics.finetune --model.backbone=transformer        # the same-size Transformer baseline
    python -m apps.genomics.finetune --model.backbone=rcps               # RC-equivariant Caduceus-PS style
    python -m apps.genomics.finetune --model.init_from=runs/genomics/pretrained   # start from a pretrained LM
    python -m apps.genomics.finetune mlm                                 # masked-LM pretraining (RC model, E. coli)
    python -m apps.genomics.finetune report runs/genomics/compare        # markdown table of finetune_result.json

After ``fit`` the test split is scored with the final weights and ``finetune_result.json`` (test/val accuracy,
wall time, optimizer steps, parameter count, seed, threads) is written to the run's log folder; the classifier is
exported in save_pretrained format (config.json + head.json + model.safetensors) for inference and the demo.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from apps.common import CPUTimeBudget
from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.genomics.data import DNADataModule
from apps.genomics.model import DNAClassifier, MaskedLMModule
from apps.genomics.tasks import LabelledDNADataModule
from ssm_core import atomic_write

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_splice.yaml"
MLM_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_mlm.yaml"


def report(folders: list[str]) -> str:
    """A markdown table of every finetune_result.json below ``folders``."""
    rows = ["| data | backbone | params | test acc | val acc | train CPU s | steps | wall s | seed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    found = sorted(p for f in folders for p in Path(f).rglob("finetune_result.json"))
    if not found:
        raise FileNotFoundError(f"no finetune_result.json below {', '.join(folders)}")
    for p in found:
        r = json.loads(p.read_text())
        rows.append(f"| {Path(r['data']).name} | {r['backbone']} | {r['params']:,} | {r['test_acc']:.3f} | "
                    f"{r['val_acc'] or float('nan'):.3f} | {r.get('train_cpu_s')} | {r['optimizer_steps']} | "
                    f"{r['fit_wall_s']} | {r['seed']} |")
    return "\n".join(rows)


def main(args: list[str] | None = None):
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:
        print(report(argv[1:] or ["runs/genomics"]))
        return None
    if argv[:1] == ["mlm"]:  # masked-LM pretraining on the causal LM's FASTA data module
        return cli_main(MaskedLMModule, DNADataModule, MLM_CONFIG, argv[1:])
    t0 = time.perf_counter()
    cli = cli_main(DNAClassifier, LabelledDNADataModule, DEFAULT_CONFIG, argv)
    if cli.subcommand != "fit":
        return cli
    fit_s = time.perf_counter() - t0
    trainer = cli.trainer
    budget = next((c for c in trainer.callbacks if isinstance(c, CPUTimeBudget)), None)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    test = trainer.test(cli.model, datamodule=cli.datamodule)[0]
    hp = cli.model.hparams
    result = {
        "backbone": hp.backbone, "task": hp.task, "pooling": hp.pooling,
        "params": sum(p.numel() for p in cli.model.model.parameters()),
        "test_acc": test.get("test/acc"), "val_acc": val.get("val/acc"), "fit_wall_s": round(fit_s, 1),
        "train_cpu_s": None if budget is None else round(budget.used_s, 1),
        "optimizer_steps": trainer.global_step, "epochs": trainer.current_epoch,
        "seed": cli.config["fit"].get("seed_everything"), "torch_threads": torch.get_num_threads(),
        "data": str(cli.datamodule.path), "n_train": len(cli.datamodule.sets["train"].ids),
    }
    out = Path(trainer.log_dir or trainer.default_root_dir) / "finetune_result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    print(json.dumps(result, indent=2))
    print(f"result written to {out}")
    return cli


if __name__ == "__main__":
    run_cli(main)
