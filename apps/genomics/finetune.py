"""Fine-tune a DNA backbone + classification head (LightningCLI): ``python -m apps.genomics.finetune``.

    python -m apps.genomics.finetune          # splice junctions: BiMamba from assets/dna_small, ~7 CPU-min
    python -m apps.genomics.finetune --config apps/genomics/configs/finetune_genus.yaml
    python -m apps.genomics.finetune --model.backbone=transformer --model.init_from=null   # same-size Transformer
    python -m apps.genomics.finetune --model.init_from=runs/genomics/pretrained   # start from another causal LM
    python -m apps.genomics.finetune mlm                                 # masked-LM pretraining (RC model, E. coli)
    python -m apps.genomics.finetune report runs/genomics/compare        # markdown table of finetune_result.json
    python -m apps.genomics.finetune ensemble RUN_DIR RUN_DIR ...       # test accuracy of the averaged runs
    python -m apps.genomics.finetune --seeds 0 1 [options]              # one run per seed, then their ensemble

``--seeds`` fits the same configuration once per seed (each run in its own log folder, exported to the
config's export folder in turn: the last seed's model stays there), then scores the ensemble of the checkpoints
they were scored with (best validation, or the final weights where the config keeps no best checkpoint; class
probabilities averaged) and writes ``ensemble_result.json`` (members, their
summed training CPU time) beside the runs' log folders.

After ``fit`` the test split is scored once and ``finetune_result.json`` (test/val accuracy, wall and process CPU
time, optimizer steps, parameter count, seed, threads) is written to the run's log folder; the classifier is
exported in save_pretrained format (config.json + head.json + model.safetensors) for inference and the demo.
The weights scored are the final ones, or, when the trainer has a ``ModelCheckpoint`` with a ``monitor``
(early stopping on validation), that checkpoint's best; ``tested`` in the result says which.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from apps.common import CPUTimeBudget, ExportPretrained
from apps.common.checkpoint import read_lightning_checkpoint
from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.genomics.data import DNADataModule
from apps.genomics.model import MaskedLMModule
from apps.genomics.tasks import FinetuneClassifier, LabelledDNADataModule
from ssm_core import atomic_write

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_splice.yaml"
MLM_CONFIG = Path(__file__).resolve().parent / "configs" / "finetune_mlm.yaml"


def report(folders: list[str]) -> str:
    """A markdown table of every finetune_result.json below ``folders``."""
    rows = ["| data | backbone | params | test acc | val acc | train CPU s | fit CPU s | steps | wall s | seed |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    found = sorted(p for f in folders for p in Path(f).rglob("finetune_result.json"))
    if not found:
        raise FileNotFoundError(f"no finetune_result.json below {', '.join(folders)}")
    for p in found:
        r = json.loads(p.read_text())
        rows.append(f"| {Path(r['data']).name} | {r['backbone']} | {r['params']:,} | {r['test_acc']:.3f} | "
                    f"{r['val_acc'] or float('nan'):.3f} | {r.get('train_cpu_s')} | {r.get('fit_cpu_s')} | "
                    f"{r['optimizer_steps']} | "
                    f"{r['fit_wall_s']} | {r['seed']} |")
    return "\n".join(rows)


def _scored_checkpoint(run: Path) -> Path:
    """The checkpoint a run's test accuracy came from: its best-*.ckpt (chosen on validation), else, for a config
    without one (genus: the final weights are tested), its checkpoints/last.ckpt, written when training ends."""
    if not run.is_dir():
        return run
    found = sorted(run.rglob("best-*.ckpt")) or sorted(run.rglob("checkpoints/last.ckpt"))
    if len(found) != 1:
        raise FileNotFoundError(f"{run}: expected one best-*.ckpt, or else one checkpoints/last.ckpt (a fine-tuning "
                                f"run's folder or the file itself), found {len(found)}")
    return found[0]


def ensemble(runs: list[str]) -> dict:
    """Test accuracy of each fine-tuned run (the checkpoint it was scored with: ``_scored_checkpoint``) and of their
    ensemble (class probabilities averaged), on the test split the runs were trained with (they must share it)."""
    from ssm_core import MambaConfig

    if not runs:
        raise ValueError("ensemble: name fine-tuning run folders (or their .ckpt files)")
    probs, labels, data, rows = [], None, None, {}
    for run in map(Path, runs):
        path = _scored_checkpoint(run)
        ckpt = read_lightning_checkpoint(path)  # weights_only
        hp = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
        hp.update(config=MambaConfig(**hp["config"]), init_from=None)  # the weights come from the checkpoint
        dm_hp = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}
        if data is not None and dm_hp["path"] != data:
            raise ValueError(f"ensemble: {path} was trained on {dm_hp['path']}, the first run on {data}")
        data = dm_hp["path"]
        model = FinetuneClassifier(**hp)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as e:  # weights of another shape than its own hyper-parameters build (an older release)
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln or "key" in ln), str(e))
            raise ValueError(f"ensemble: {path}: its weights do not fit the model its saved hyper-parameters build "
                             f"({detail}); it was written by another version of finetune") from None
        model.eval()
        dm = LabelledDNADataModule(**dm_hp)
        dm.setup("test")
        with torch.no_grad():
            batches = list(dm.test_dataloader())
            p = torch.cat([model.predict_step(b, i).float() for i, b in enumerate(batches)])
            run_labels = torch.cat([b["labels"] for b in batches])
        if labels is not None and not torch.equal(run_labels, labels):  # same file, other label order or rows
            raise ValueError(f"ensemble: {path} sees other test labels than the first run (label order or split)")
        labels = run_labels
        probs.append(p)
        rows[str(path)] = float((p.argmax(-1) == labels).float().mean())
    mean = torch.stack(probs).mean(0)
    return {"data": data, "members": rows, "test_acc": float((mean.argmax(-1) == labels).float().mean()),
            "n_test": int(labels.numel())}


def fit_seeds(argv: list[str]) -> dict:
    """``--seeds S [S ...]`` in argv: fit once per seed (the rest of argv each time), then their ensemble."""
    i = argv.index("--seeds")
    seeds = []
    for a in argv[i + 1:]:
        if not a.lstrip("-").isdigit():
            break
        seeds.append(int(a))
    rest = argv[:i] + argv[i + 1 + len(seeds):]
    if len(seeds) < 2 or len(set(seeds)) < len(seeds) or any(a.startswith("--seed_everything") for a in rest):
        raise ValueError(f"--seeds: name two or more distinct seeds (and no --seed_everything), got {seeds}")
    runs = [Path(main([*rest, f"--seed_everything={s}"]).trainer.log_dir) for s in seeds]
    result = ensemble([str(r) for r in runs])
    members = [json.loads((r / "finetune_result.json").read_text()) for r in runs]
    result.update(seeds=seeds, runs=[str(r) for r in runs],
                  train_cpu_s=round(sum(m["train_cpu_s"] or 0.0 for m in members), 1))
    out = runs[0].parent / "ensemble_result.json"
    atomic_write(out, lambda p: Path(p).write_text(json.dumps(result, indent=2)))
    print(json.dumps(result, indent=2))
    print(f"ensemble of {len(runs)} runs written to {out}")
    return result


def main(args: list[str] | None = None):
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:
        print(report(argv[1:] or ["runs/genomics"]))
        return None
    if argv[:1] == ["ensemble"]:
        print(json.dumps(ensemble(argv[1:]), indent=2))
        return None
    if argv[:1] == ["mlm"]:  # masked-LM pretraining on the causal LM's FASTA data module
        return cli_main(MaskedLMModule, DNADataModule, MLM_CONFIG, argv[1:])
    if "--seeds" in argv:
        return fit_seeds(argv)
    t0, c0 = time.perf_counter(), time.process_time()
    cli = cli_main(FinetuneClassifier, LabelledDNADataModule, DEFAULT_CONFIG, argv)
    if cli.subcommand != "fit":
        return cli
    fit_s, fit_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    trainer = cli.trainer
    budget = next((c for c in trainer.callbacks if isinstance(c, CPUTimeBudget)), None)
    best = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor
                 and c.best_model_path), None)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    tested = "final weights"
    if best is not None:  # early stopping on validation: the best checkpoint is scored, reported and exported
        ckpt = read_lightning_checkpoint(best.best_model_path)  # torch.load(weights_only=True)
        cli.model.load_state_dict(ckpt["state_dict"])
        tested = f"best {best.monitor} checkpoint (epoch {ckpt['epoch']}, step {ckpt['global_step']})"
        if best.monitor.startswith("val/") and best.best_model_score is not None:
            val[best.monitor] = float(best.best_model_score)
        for export in (c for c in trainer.callbacks if isinstance(c, ExportPretrained)):
            cli.model.model.save_pretrained(export.target(trainer))
            print(f"{tested} written to {export.target(trainer)}")
    test = trainer.test(cli.model, datamodule=cli.datamodule)[0]
    hp = cli.model.hparams
    result = {
        "backbone": hp.backbone, "task": hp.task, "pooling": hp.pooling, "center_window": hp.get("center_window"),
        "params": sum(p.numel() for p in cli.model.model.parameters()),
        "test_acc": test.get("test/acc"), "val_acc": val.get("val/acc"), "tested": tested,
        "fit_wall_s": round(fit_s, 1), "fit_cpu_s": round(fit_cpu_s, 1),
        "train_cpu_s": None if budget is None else round(budget.used_s, 1),
        "optimizer_steps": trainer.global_step, "epochs": trainer.current_epoch,
        "seed": cli.config["fit"].get("seed_everything"), "torch_threads": torch.get_num_threads(),
        "init_from": hp.get("init_from"), "label_smoothing": hp.get("label_smoothing"),
        "strand_average": hp.get("strand_average"), "eval_crop": cli.datamodule.hparams.get("eval_crop"),
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
