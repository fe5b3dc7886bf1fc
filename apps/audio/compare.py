"""Mamba U-Net vs LTI U-Net (the S4-SaShiMi stand-in) vs a U-Net with a Transformer centre, equal parameters
(within 1%) and the same CPU time:

    python -m apps.audio.compare --minutes 8 [--classifier runs/audio/classifier]   # -> runs/audio_compare/
    python -m apps.audio.compare --variants lti_outer lti_complex_outer   # real vs complex LTI next to the waveform

Each model is apps/audio/configs/default.yaml with only ``model.config`` entries of its variant changed (same
data, crops, batch, optimiser, seed 0), trained until it has used ``--minutes`` of CPU time (apps.common
CPUTimeBudget). The default variants are matched in parameters: the LTI block has no x_proj / dt_proj, so its
state is 32 (S4 layers use 32-64) where the Mamba's is 8; the attention centre gets the Transformer's gated MLP
(hidden 0.875 x width). ``lti`` / ``attention_centre`` are the unmatched ones (7% / 19% fewer parameters).
Reported: parameters, steps, held-out NLL on whole test clips (unseen voices), and, with ``--classifier``,
the SC09 sample metrics (apps.audio.metrics) of ``--n-samples`` one-second unconditional clips per model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from apps.audio.data import write_audio
from apps.common.errors import run_cli

VARIANTS = {  # model.config entries that differ from configs/default.yaml (blocks outer -> centre)
    "mamba": {"blocks": "mamba"},                    # selective SSM at every level: 457,920 parameters
    "lti_n32": {"blocks": "lti", "ssm_cfg": {"d_state": 32}},  # selection off (S4D-like), state 32: 454,848
    "transformer_centre": {"blocks": ["mamba", "mamba", "attention"], "ff": [0, 0, 0.875]},  # 455,616
    "lti": {"blocks": "lti"},                        # unmatched: 426,816
    "attention_centre": {"blocks": ["mamba", "mamba", "attention"]},  # unmatched, no MLP: 369,344
    # the Mamba paper's complex-vs-real question next to the waveform: LTI outer stages, Mamba inside
    "lti_outer": {"blocks": ["lti", "mamba", "mamba"]},
    "lti_complex_outer": {"blocks": ["lti_complex", "mamba", "mamba"]},  # complex diagonal A, S4D-Lin init
}


def config_args(changes: dict) -> list[str]:
    """--model.config.KEY=VALUE arguments (a string as it is: JSON quotes would become part of the name)."""
    return [f"--model.config.{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in changes.items()]


def run(name: str, changes: dict, minutes: float, out: Path, extra: list[str]) -> dict:
    from apps.audio.evaluate import HeldOutNLL
    from apps.audio.train import main as train_main
    from apps.common.callbacks import CPUTimeBudget

    # this run's own callbacks (the default config's would export to runs/audio/pretrained)
    overrides = {"trainer": {"callbacks": [
        {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
         "init_args": {"monitor": "val/nats_per_sample", "save_last": True}},
        {"class_path": "apps.common.callbacks.ExportPretrained",
         "init_args": {"dirpath": str(out / name / "pretrained")}},
        {"class_path": "apps.audio.evaluate.HeldOutNLL", "init_args": {"split": "test", "max_clips": 64}},
        {"class_path": "apps.common.callbacks.CPUTimeBudget", "init_args": {"minutes": minutes}}]}}
    (out / name).mkdir(parents=True, exist_ok=True)
    config = out / name / "compare.yaml"
    config.write_text(json.dumps(overrides))  # JSON is YAML
    args = ["fit", f"--config={config}", *config_args(changes), "--trainer.max_time=null",
            "--trainer.max_steps=100000", f"--trainer.default_root_dir={out / name}",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.logger.init_args.name={name}",
            "--trainer.enable_progress_bar=false", *extra]
    t0 = time.perf_counter()
    cli = train_main(args)
    wall = time.perf_counter() - t0
    held = next(c for c in cli.trainer.callbacks if isinstance(c, HeldOutNLL)).result or {}
    budget = next(c for c in cli.trainer.callbacks if isinstance(c, CPUTimeBudget))
    model = cli.model.model
    return {"name": name, **changes, "params": model.num_parameters(), "steps": cli.trainer.global_step,
            "cpu_minutes": round(budget.used_s / 60, 2), "wall_s": round(wall, 1),
            "test_nats_per_sample": held.get("nats_per_sample"), "test_bits_per_sample": held.get("bits_per_sample"),
            "test_clips": held.get("clips")}


def reference(classifier: str, root: str | None, max_clips: int = 1000):
    """The digit classifier and its (probs, features) on real training clips: the metrics' reference."""
    from apps.audio.data import default_data_root, load_tokens, speech_commands_splits
    from apps.audio.metrics import DigitClassifier, _waves, classify

    clf = DigitClassifier.load(classifier)
    clips = speech_commands_splits(root or default_data_root() / "digits")["train"]
    wav, _ = _waves(load_tokens(clips[:: max(1, len(clips) // max_clips)]))
    return clf, tuple(t.numpy() for t in classify(clf, wav))


def sample_metrics(result: dict, out: Path, clf, ref, n: int) -> None:
    """Generate n one-second unconditional clips (batches of 16, compiled step), write them, score them."""
    from apps.audio.generate import generate
    from apps.audio.metrics import score_clips
    from apps.audio.model import AudioUNet

    model = AudioUNet.from_pretrained(out / result["name"] / "pretrained").eval()
    t0 = time.perf_counter()
    wavs = torch.cat([generate(model, min(16, n - s), 1.0, seed=s) for s in range(0, n, 16)])
    result["gen_samples_per_s"] = round(wavs.numel() / (time.perf_counter() - t0))
    for i, w in enumerate(wavs):
        write_audio(out / result["name"] / "samples" / f"{i:03d}.wav", w)
    result["metrics"] = score_clips(clf, wavs, ref)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="CPU minutes of training per model")
    p.add_argument("--out", type=Path, default=Path("runs/audio_compare"))
    p.add_argument("--variants", nargs="+", default=["mamba", "lti_n32", "transformer_centre"], choices=list(VARIANTS))
    p.add_argument("--classifier", help="a digit classifier folder (python -m apps.audio.metrics train)")
    p.add_argument("--n-samples", type=int, default=64)
    p.add_argument("--root", help="the digits / SC09 folder for the metrics' reference")
    p.add_argument("--threads", type=int, default=2)
    a, extra = p.parse_known_args(argv)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    clf, ref = reference(a.classifier, a.root) if a.classifier else (None, None)
    results = []
    for name in a.variants:
        r = run(name, VARIANTS[name], a.minutes, a.out, extra)
        if clf is not None:
            sample_metrics(r, a.out, clf, ref, a.n_samples)
        results.append(r)
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(r), flush=True)
    return results


if __name__ == "__main__":
    run_cli(main)
