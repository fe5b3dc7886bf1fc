"""python -m apps.genomics.train / evaluate: the LightningCLI run end to end on the bundled genome (tiny model),
resume, gradient accumulation, --config files, warm-up in the logged lengths, DDP with 2 CPU processes,
and the exact chunked evaluation."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apps.genomics.data import SAMPLE_FASTA, VOCAB_SIZE, FastaReader, Interval
from apps.genomics.evaluate import bits_per_base, load_model
from apps.genomics.evaluate import main as evaluate_main
from apps.genomics.train import main as train_main

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[3]
TINY = ["--model.config.d_model=32", "--model.config.n_layer=1", "--data.seq_len=64", "--data.batch_size=2",
        "--data.samples_per_epoch=4", "--data.warmup_min_len=16", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--data.eval_batch_size=64", "--trainer.limit_val_batches=2"]

def heldout_bits(cli) -> float:
    """The bits/base HeldOutBitsPerBase measured when fitting ended."""
    from apps.genomics.evaluate import HeldOutBitsPerBase

    cb = next(c for c in cli.trainer.callbacks if isinstance(c, HeldOutBitsPerBase))
    return cb.result["value"]



def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_train_default_command_end_to_end_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = train_main([*TINY, "--trainer.max_steps=6"])
    assert cli.trainer.global_step == 6
    out = capsys.readouterr().out
    assert "held-out bits/base (test, 14,999 bases, whole intervals" in out
    assert 1.5 < heldout_bits(cli) < 3.6
    run = tmp_path / "runs" / "genomics" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    pretrained = tmp_path / "runs" / "genomics" / "pretrained"
    assert (pretrained / "config.json").is_file() and (pretrained / "model.safetensors").is_file()
    # warm-up: 2 steps per epoch at 16, 32, then 64 bases (batch 8, 4, 2: 128 tokens per batch)
    lengths = [float(r["train/seq_len"]) for r in metrics(run) if r.get("train/seq_len")]
    assert lengths == [16, 16, 32, 32, 64, 64]
    assert any(r.get("val/bits_per_base") for r in metrics(run))
    # the exported model scores the test split exactly as train reported
    bits = evaluate_main(["--ckpt", str(pretrained), "--fasta", str(SAMPLE_FASTA), "--split", "test"])
    assert math.isclose(bits, heldout_bits(cli), rel_tol=1e-5)
    from_ckpt = evaluate_main(["--ckpt", str(run / "checkpoints" / "last.ckpt"), "--fasta", str(SAMPLE_FASTA),
                               "--split", "test"])
    assert math.isclose(from_ckpt, bits, rel_tol=1e-5)  # the Lightning checkpoint holds the same network
    # resume: the step counter, optimiser and epoch continue from the checkpoint
    resumed = train_main([*TINY, "--trainer.max_steps=8", f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    assert resumed.trainer.global_step == 8 and resumed.trainer.current_epoch >= 3
    lengths = [float(r["train/seq_len"]) for r in metrics(tmp_path / "runs" / "genomics" / "version_1")
               if r.get("train/seq_len")]
    assert lengths == [64, 64]  # resumed in the warm-up's last stage, not back at 16


def test_config_file_and_gradient_accumulation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("model:\n  lr: 0.01\ndata:\n  rc_aug: false\n"
                                        "trainer:\n  accumulate_grad_batches: 2\n")
    cli = train_main(["--config", "mine.yaml", *TINY, "--trainer.max_steps=2", "--data.warmup_min_len=null",
                      "--trainer.limit_val_batches=0"])
    assert cli.model.hparams.lr == 0.01 and cli.datamodule.hparams.rc_aug is False
    assert cli.trainer.global_step == 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4  # 2 batches per optimiser step


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "apps.genomics.train", *TINY, "--trainer.max_steps=3",
                          "--data.test_frac=0.002",
                          "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]
    assert "MEMBER: 2/2" in log and "distributed_backend=gloo" in log
    assert log.count("held-out bits/base (test,") == 1  # rank 0 only
    assert (tmp_path / "runs" / "genomics" / "pretrained" / "model.safetensors").is_file()


def test_chunked_evaluation_is_exact(tmp_path):
    """Segments of the FASTA and pieces of the forward, state carried across both, give the one-shot
    log-likelihood; N targets are skipped."""
    torch.manual_seed(0)
    from apps.genomics.model import small_config
    from ssm_core import MambaLMHeadModel

    model = MambaLMHeadModel(small_config(d_model=32, n_layer=2)).double()
    fa = FastaReader(SAMPLE_FASTA)
    seq = fa.fetch("NC_007779.1", 5000, 5600)
    path = tmp_path / "n.fa"
    path.write_text(f">x\n{seq[:300]}NNNN{seq[300:]}\n>y\n{seq[:50]}\n")
    fa = FastaReader(path)
    ivs = [Interval("x", 0, 604), Interval("y", 0, 50)]
    bits, n = bits_per_base(model, fa, ivs, chunk_len=37, segment=101, progress=False)

    def one_shot(pieces):
        total, count = 0.0, 0
        for ids in pieces:
            logits = model(ids[None, :-1]).logits[0, :, :VOCAB_SIZE]
            nll = F.cross_entropy(logits, ids[1:], reduction="none")
            keep = ids[1:] != 11
            total, count = total + float(nll[keep].sum()), count + int(keep.sum())
        return total / count / math.log(2), count

    exact, count = one_shot([fa.tokens(iv.chrom, iv.start, iv.end) for iv in ivs])
    assert n == count == 603 - 4 + 49
    assert math.isclose(bits, exact, rel_tol=1e-6)  # sequence_nll scores float32 logits
    # the same segments without the carried state score differently: the check above can see a lost state
    x = fa.tokens("x")
    no_carry, _ = one_shot([x[s : s + 102] for s in range(0, 603, 101)] + [fa.tokens("y")])
    assert abs(no_carry - exact) > 1e-4
    model.save_pretrained(tmp_path / "m")
    assert load_model(tmp_path / "m").config == model.config
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "nothing")


def test_transformer_baseline_config_is_transformer_like_of_the_default(tmp_path, monkeypatch):
    """configs/transformer_baseline.yaml, read over default.yaml by the CLI, builds exactly
    apps.common.transformer_like(the default Mamba) and trains through the same module."""
    from apps.common import transformer_like
    from apps.genomics.model import small_config

    monkeypatch.chdir(tmp_path)
    cfg = ROOT / "apps" / "genomics" / "configs" / "transformer_baseline.yaml"
    cli = train_main(["--config", str(cfg), "--data.seq_len=64", "--data.samples_per_epoch=2",
                      "--data.warmup_min_len=null", "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
                      "--trainer.enable_progress_bar=false", "--data.eval_batch_size=64",
                      "--data.test_frac=0.002"])  # attention over a 15 kb test interval is slow on CPU
    assert cli.model.config == transformer_like(small_config())
    assert (tmp_path / "runs" / "genomics_transformer" / "pretrained" / "config.json").is_file()


def test_shipped_checkpoint_scores_what_docs_say():
    """apps/genomics/assets/dna_small (the default command's output) and its recorded held-out bits/base."""
    asset = ROOT / "apps" / "genomics" / "assets" / "dna_small"
    assert sum(f.stat().st_size for f in asset.iterdir()) < 2_000_000
    bits = evaluate_main(["--ckpt", str(asset), "--fasta", str(SAMPLE_FASTA), "--split", "test"])
    assert abs(bits - 1.9725) < 5e-4  # docs/genomics.md
    assert "1.9725" in (ROOT / "docs" / "genomics.md").read_text()


def test_shipped_multi_genome_model_is_the_default_of_evaluate_predict_and_the_demo(tmp_path, monkeypatch, capsys):
    import apps.common.paths as paths
    from apps.genomics import demo, predict
    from apps.genomics.model import SHIPPED_LM, default_lm

    assert (SHIPPED_LM / "model.safetensors").stat().st_size <= 20_000_000  # the size cap
    monkeypatch.chdir(tmp_path)  # no runs/genomics/pretrained here or under the (patched) repository root
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    assert default_lm() == SHIPPED_LM and SHIPPED_LM in demo.LM_CANDIDATES
    bits = evaluate_main(["--fasta", str(SAMPLE_FASTA), "--split", "test"])
    assert bits < 1.95  # the E. coli sample's held-out tail; dna_small (trained on the sample) scores 1.9725
    capsys.readouterr()
    predict.main(["generate", "--prompt", "ACGTTGCA", "--n", "20", "--seed", "0"])
    out = capsys.readouterr().out.strip()
    assert len(out) == 28 and out.startswith("ACGTTGCA") and set(out) <= set("ACGT")
    (tmp_path / "runs" / "genomics" / "pretrained").mkdir(parents=True)
    assert default_lm() == SHIPPED_LM  # an empty folder is not a checkpoint
    with pytest.raises(FileNotFoundError, match="nope: no such DNA language model folder"):
        evaluate_main(["--ckpt", str(tmp_path / "nope"), "--fasta", str(SAMPLE_FASTA)])
