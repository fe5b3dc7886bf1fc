"""Million-length DNA training: the chunked loss through DNALM gives the one-shot gradients, and the
long_1m config builds and trains (at a small length here; benchmarks/long_dna.py measures 2^12 .. 2^20)."""

from pathlib import Path

import pytest
import torch
import yaml

from apps.genomics.data import DNADataModule
from apps.genomics.model import DNALM, small_config
from apps.genomics.train import main as train_main
from ssm_core import MambaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = Path(__file__).resolve().parents[2] / "apps" / "genomics" / "configs" / "long_1m.yaml"

def heldout_bits(cli) -> float:
    """The bits/base HeldOutBitsPerBase measured when fitting ended."""
    from apps.genomics.evaluate import HeldOutBitsPerBase

    cb = next(c for c in cli.trainer.callbacks if isinstance(c, HeldOutBitsPerBase))
    return cb.result["value"]



def real_batch(seq_len: int, batch: int = 2) -> dict:
    dm = DNADataModule(seq_len=seq_len, batch_size=batch, samples_per_epoch=batch, rc_aug=True)
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("layer", ["Mamba1", "Mamba2"])
def test_chunked_gradient_equals_one_shot_through_the_module(layer):
    torch.manual_seed(0)
    cfg = small_config(d_model=32, n_layer=2, layer=layer)
    if layer == "Mamba2":
        cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=12,
                          ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 16, "chunk_size": 32})
    one = DNALM(cfg).double()
    chunked = DNALM(cfg, chunk_len=64).double()
    chunked.load_state_dict(one.state_dict())
    batch = real_batch(300)  # 300 = 4 pieces of 64 + a ragged one of 44
    batch["labels"][0, 10:20] = -100  # ignored targets weigh the same in both paths
    losses = []
    for m in (one, chunked):
        loss, n = m.lm_loss(batch)
        loss.backward()
        losses.append((loss, n))
    assert losses[0][1] == losses[1][1] == int((batch["labels"] != -100).sum())
    # CausalLMModule's one-shot path scores float32 logits (.float()), the chunked one float64: compare at
    # float32 precision, far below any difference a wrong state hand-off would make (~1e-2)
    torch.testing.assert_close(losses[1][0].float(), losses[0][0].float(), rtol=1e-6, atol=1e-7)
    for (name, p), q in zip(one.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)
    # truncated BPTT (detach_state) is a different gradient: the test above would notice a silent detach
    tbptt = DNALM(cfg, chunk_len=64, detach_state=True).double()
    tbptt.load_state_dict(one.state_dict())
    tbptt.lm_loss(batch)[0].backward()
    assert not torch.allclose(tbptt.model.backbone.layers[0].mixer.in_proj.weight.grad,
                              one.model.backbone.layers[0].mixer.in_proj.weight.grad)


def test_long_1m_config_is_a_million_bases_with_exact_chunks():
    cfg = yaml.safe_load(LONG.read_text())
    assert cfg["data"]["seq_len"] == 2**20 and cfg["data"]["batch_size"] == 1
    chunk = cfg["model"]["chunk_len"]
    assert 0 < chunk < 2**20 and 2**20 % chunk == 0 and not cfg["model"].get("detach_state", False)
    model = DNALM(MambaConfig(**cfg["model"]["config"]), chunk_len=chunk)
    assert model.hparams.chunk_len == chunk


def test_long_config_trains_through_the_cli_at_a_small_length(tmp_path, monkeypatch):
    """The long_1m config as shipped, with the length scaled down and the bundled genome: the chunked path
    (L > chunk_len) runs in training, validation and the held-out evaluation."""
    monkeypatch.chdir(tmp_path)
    cli = train_main(["--config", str(LONG), "--data.fasta=datasets/samples/ecoli_k12_w3110_300kb.fa.gz",
                      "--data.seq_len=4096", "--model.chunk_len=1024", "--data.valid_frac=0.02",
                      "--data.test_frac=0.01", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                      "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 2
    assert (tmp_path / "runs" / "genomics_long" / "pretrained" / "model.safetensors").is_file()
    assert 1.0 < heldout_bits(cli) < 3.0


def test_benchmark_lengths_targets_and_projection():
    """benchmarks.long_dna: lengths up to 2^23 (2^k syntax), bytes/base from the two longest runs, peaks at 2^22 /
    2^23 projected (and labelled so) when not run, and the memory and linear-time targets checked."""
    import argparse

    from benchmarks import long_dna as bench

    assert bench.parse_length("2^22") == bench.parse_length("2**22") == bench.parse_length("4194304") == 2**22
    for bad in ("2^24", "0", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_length(bad)

    def row(L, s, mb):
        return {"L": L, "seconds": s, "peak_rss_mb": mb, "rss_before_mb": 800.0, "chunk_len": 16384,
                "params": 66496}

    rows = [row(2**14, 1.0, 1000.0), row(2**16, 4.0, 1100.0), row(2**18, 16.0, 1100.0 + 0.5 * 3),
            row(2**20, 64.0, 1101.5 + 1.5 * 0.5 * 4)]
    slope = bench.bytes_per_base(rows)
    assert slope == pytest.approx((rows[3]["peak_rss_mb"] - rows[2]["peak_rss_mb"]) * 2**20 / (2**20 - 2**18))
    proj = bench.projections(rows)
    assert set(proj) == {2**22, 2**23}
    assert proj[2**22] == pytest.approx(rows[3]["peak_rss_mb"] + slope * 3)
    checks = dict(bench.checks(rows))
    assert all(checks.values()) and len(checks) == 2  # memory and time(2^20)/time(2^16)
    block = bench.render(rows, 1, ("1.0/1.0/1.0", "2.0/2.0/2.0"))
    assert "(projected)" in block and "not run" in block and "MISSED" not in block
    # measured 2^22: its own row, the 2^22/2^20 target, no projection for it; a missed target says so
    rows.append(row(2**22, 64.0 * 5, 9000.0))
    checks = bench.checks(rows)
    assert [met for _, met in checks] == [False, True, False]
    assert 2**22 not in bench.projections(rows) and "MISSED" in bench.render(rows, 1, ("-", "-"))
