"""Fine-tuning: the labelled-data reader and datamodule, the bundled splice/genus samples, the finetune CLI end to
end (it must learn a separable task), masked-LM pretraining and the CPU-time budget."""

import gzip
import json
import random
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from torch.utils.data import DataLoader

from apps.common import CPUTimeBudget
from apps.genomics.data import A_ID, PAD_ID, VOCAB_SIZE, decode, encode
from apps.genomics.finetune import ensemble, main, report
from apps.genomics.model import DNAClassifier, DNAModel, MaskedLMModule, rc_ids
from apps.genomics.tasks import (
    GENUS_SAMPLE,
    SPLICE_SAMPLE,
    FinetuneClassifier,
    LabelledDNADataModule,
    collate,
    read_labelled_tsv,
)
from ssm_core import MambaConfig

pytestmark = pytest.mark.usefixtures("one_thread", "ref_backend")
TINY = MambaConfig(d_model=16, n_layer=1, vocab_size=VOCAB_SIZE, ssm_cfg={"d_state": 4})


@pytest.fixture(scope="module")
def ref_backend():
    """Tiny models: the pure-PyTorch scan, so no compiled-kernel build happens inside these tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISS_BACKEND", "ref")
        yield


def write_gc_task(path, n=(160, 40, 40), L=24, seed=0):
    """AT-rich vs GC-rich sequences (85% of one kind): separable, learnable in a few dozen steps."""
    rng = random.Random(seed)
    lines = ["split\tlabel\tid\tsequence"]
    for split, k in zip(("train", "val", "test"), n):
        for i in range(k):
            label = rng.choice(["AT", "GC"])
            rich, poor = (("AT", "GC") if label == "AT" else ("GC", "AT"))
            seq = "".join(rng.choice(rich if rng.random() < 0.85 else poor) for _ in range(L))
            lines.append(f"{split}\t{label}\t{split}{i}\t{seq}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bundled_samples_decode_to_real_splice_sites():
    sets = read_labelled_tsv(SPLICE_SAMPLE)
    assert [len(sets[s].ids) for s in ("train", "val", "test")] == [2000, 186, 1000]
    seqs = {lab: [decode(t) for t, y in zip(sets["train"].tokens, sets["train"].labels) if y == lab]
            for lab in ("EI", "IE", "N")}
    assert all(len(s) == 60 for v in seqs.values() for s in v)
    # donor sites (exon|intron) start the intron with GT, acceptors end it with AG: the one-hot decoding is right
    assert sum(s[30:32] == "GT" for s in seqs["EI"]) / len(seqs["EI"]) > 0.97
    assert sum(s[28:30] == "AG" for s in seqs["IE"]) / len(seqs["IE"]) > 0.97
    genus = read_labelled_tsv(GENUS_SAMPLE)
    strains = {s: {i.split(":")[0] for i in genus[s].ids} for s in ("train", "test")}
    assert len(strains["test"]) == 4 and not strains["test"] & strains["train"]  # held-out strains
    assert sorted(set(genus["test"].labels)) == ["Escherichia", "Helicobacter", "Staphylococcus", "Vibrio"]


def test_tsv_errors(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_text("split\tlabel\tsequence\n")
    with pytest.raises(ValueError, match="x.tsv:1: header"):
        read_labelled_tsv(p)
    p.write_text("split\tlabel\tid\tsequence\ntrain\tA\tr1\tACGT\ndev\tA\tr2\tACGT\n")
    with pytest.raises(ValueError, match="x.tsv:3: split 'dev'"):
        read_labelled_tsv(p)
    p.write_text("split\tlabel\tid\tsequence\ntrain\tA\tr1\tACJT\n")
    with pytest.raises(ValueError, match="x.tsv:2: character 'J' at position 2"):
        read_labelled_tsv(p)
    with pytest.raises(FileNotFoundError, match="not found"):
        read_labelled_tsv(tmp_path / "absent.tsv.gz")
    # a recipe's output (the folder names the recipe): the error says which script makes it
    with pytest.raises(FileNotFoundError, match=r"make it with python datasets/recipes/genus.py --out .*absent"):
        read_labelled_tsv(Path("datasets") / "genus" / "absent.tsv.gz")


def test_datamodule_padding_crop_and_labels(tmp_path):
    p = tmp_path / "d.tsv.gz"
    with gzip.open(p, "wt") as f:
        f.write("split\tlabel\tid\tsequence\ntrain\tb\tr1\tACGTACGTAC\ntrain\ta\tr2\tGGG\nval\ta\tr3\tAACCGGTTAA\n"
                "test\tb\tr4\tA\n")
    dm = LabelledDNADataModule(str(p), batch_size=2, crop=6)
    assert dm.labels == ["a", "b"]
    batch = next(iter(dm.val_dataloader()))
    assert decode(batch["input_ids"][0]) == "CCGGTT"  # centre crop in evaluation
    b = collate([(encode("ACG"), 1), (encode("A"), 0)])
    assert batch["labels"].tolist() == [0] and b["lengths"].tolist() == [3, 1]
    assert b["input_ids"][1].tolist() == [A_ID, PAD_ID, PAD_ID]
    with pytest.raises(ValueError, match="not among"):
        LabelledDNADataModule(str(p), labels=["a"]).setup()
    whole = LabelledDNADataModule(str(p), batch_size=2, crop=6, eval_crop=0)  # evaluation reads whole windows
    assert decode(next(iter(whole.val_dataloader()))["input_ids"][0]) == "AACCGGTTAA"
    assert decode(next(iter(LabelledDNADataModule(str(p), crop=6, eval_crop=4).val_dataloader()))["input_ids"][0]) \
        == "CGGT"
    assert all(len(x) == 6 for x, _ in whole.train_dataloader().dataset if len(x) > 3)


def test_a_larger_training_file_replaces_only_the_training_rows(tmp_path):
    """data.train_path: training rows from a recipe's larger sample, validation and test from the bundled file."""
    main_tsv, extra = tmp_path / "main.tsv", tmp_path / "extra.tsv"
    main_tsv.write_text("split\tlabel\tid\tsequence\ntrain\ta\tm1\tACGT\ntrain\tb\tm2\tGGCC\n"
                        "val\ta\tm3\tAAAA\ntest\tb\tm4\tCCCC\n")
    extra.write_text("split\tlabel\tid\tsequence\n" + "".join(f"train\t{'ab'[i % 2]}\te{i}\tACGTAC\n" for i in range(6))
                     + "test\ta\tignored\tTTTT\n")
    dm = LabelledDNADataModule(str(main_tsv), train_path=str(extra))
    dm.setup()
    assert dm.sets["train"].ids == [f"e{i}" for i in range(6)] and dm.sets["test"].ids == ["m4"]
    assert dm.sets["val"].ids == ["m3"] and dm.labels == ["a", "b"]
    extra.write_text("split\tlabel\tid\tsequence\ntrain\ta\te0\tACGT\ntrain\tc\te1\tACGT\n")
    with pytest.raises(ValueError, match=r"extra.tsv: training labels differ .* \['b', 'c'\]"):
        LabelledDNADataModule(str(main_tsv), train_path=str(extra)).setup()


def test_strand_average_is_strand_invariant_in_evaluation_only():
    torch.manual_seed(0)
    clf = FinetuneClassifier(TINY, num_labels=3, strand_average=True, label_smoothing=0.1)
    assert clf.label_smoothing == 0.1 and clf.hparams.strand_average
    ids = torch.randint(A_ID, A_ID + 4, (3, 20))
    lengths = torch.tensor([20, 13, 7])
    ids[1, 13:] = PAD_ID
    ids[2, 7:] = PAD_ID
    clf.eval()
    with torch.no_grad():
        out, out_rc = clf(ids, lengths), clf(rc_ids(ids, lengths), lengths)
        alone = clf(ids[1:2, :13], lengths[1:2])
    torch.testing.assert_close(out, out_rc, atol=1e-5, rtol=0)  # the bimamba net itself is not RC-invariant
    torch.testing.assert_close(out[1:2], alone, atol=1e-5, rtol=0)  # padding changes nothing
    assert bool((out <= 0).all())  # a mean of log-probabilities
    clf.train()
    clf.model.dropout.p = 0.0
    with torch.no_grad():
        assert not torch.allclose(clf(ids, lengths), clf(rc_ids(ids, lengths), lengths), atol=1e-4)
    with pytest.raises(ValueError, match="label_smoothing"):
        FinetuneClassifier(TINY, num_labels=2, label_smoothing=1.0)
    with pytest.raises(ValueError, match="strand_average"):
        FinetuneClassifier(TINY, num_labels=2, task="token", strand_average=True)


def test_finetune_cli_learns_and_exports(tmp_path):
    data = write_gc_task(tmp_path / "gc.tsv")
    cls_dir = tmp_path / "classifier"
    cli = main(["--data.path", str(data), "--data.batch_size", "16", "--model.num_labels", "2",
                "--model.config.d_model", "16", "--model.config.n_layer", "1", "--model.config.ssm_cfg",
                "{d_state: 4}", "--model.backbone", "rcps", "--model.pooling", "mean",  # the splice default: center
                "--model.center_window", "0",  # the splice default reads centre +- 5; mean pooling reads all
                "--model.init_from", "null", "--model.lr", "0.01",
                "--model.warmup_steps", "5",
                "--trainer.max_steps", "40", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.callbacks.dirpath", str(cls_dir), "--trainer.enable_progress_bar", "false",
                "--trainer.enable_model_summary", "false"])
    result = json.loads((tmp_path / "lightning_logs" / "version_0" / "finetune_result.json").read_text())
    assert result["backbone"] == "rcps" and result["optimizer_steps"] == 40 and result["seed"] == 0
    assert result["test_acc"] >= 0.9, result
    assert f"| gc.tsv | rcps | {result['params']:,} | {result['test_acc']:.3f} |" in report([str(tmp_path)])
    model = DNAModel.from_pretrained(cls_dir)
    assert model.head_config.labels == ["AT", "GC"]
    with torch.no_grad():
        pred = model(torch.stack([encode("ATTATAATTTATATAATTAAATAT"), encode("GCGGCCGCGCGGCCGCGGGCCGCG")]))
    assert pred.argmax(-1).tolist() == [0, 1]
    assert cli.model.model.rc_equivariant
    # the ensemble of a run with itself is that run: same test split, same accuracy
    both = ensemble([str(tmp_path), str(tmp_path)])
    assert both["test_acc"] == pytest.approx(result["test_acc"]) and both["data"] == str(data)
    assert list(both["members"].values()) == [pytest.approx(result["test_acc"])]  # one path, listed once
    with pytest.raises(FileNotFoundError, match="best-.*last.ckpt"):
        ensemble([str(cls_dir)])
    # weights that do not fit the model their hyper-parameters build (an older release's): named, not a raw error
    ckpt = torch.load(next(tmp_path.rglob("checkpoints/last.ckpt")), map_location="cpu", weights_only=True)
    head = next(k for k in ckpt["state_dict"] if k.endswith("head.weight"))
    ckpt["state_dict"][head] = torch.zeros(ckpt["state_dict"][head].shape[0], 7)
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match=r"old.ckpt: its weights do not fit .*size mismatch"):
        ensemble([str(tmp_path / "old.ckpt")])


@pytest.mark.parametrize("name", ["finetune_splice.yaml", "finetune_genus.yaml"])
def test_shipped_finetune_configs_build_their_head_and_train(name, tmp_path):
    """Each task config, read over the default (finetune_splice.yaml), builds a consistent model: a key the default
    sets and the task config forgets (centre +- 5 under mean pooling) is refused at build time, so it fails here.
    Shrunk to a tiny model on a tiny task; the readout (pooling, centre window, strand averaging) is the config's."""
    cfg = Path(__file__).resolve().parents[3] / "apps" / "genomics" / "configs" / name
    data = write_gc_task(tmp_path / "gc.tsv", n=(32, 8, 8))
    main(["--config", str(cfg), "--data.path", str(data), "--data.train_path", str(data), "--data.crop", "0",
          "--data.eval_crop", "0", "--trainer.val_check_interval", "1.0",
          "--model.num_labels", "2", "--model.config.d_model", "16", "--model.config.n_layer", "1",
          "--model.config.ssm_cfg", "{d_state: 4}", "--model.init_from", "null", "--trainer.max_steps", "2",
          "--trainer.max_epochs", "2", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks.dirpath", str(tmp_path / "export"),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"])
    result = json.loads((tmp_path / "lightning_logs" / "version_0" / "finetune_result.json").read_text())
    shipped = yaml.safe_load(cfg.read_text())["model"]
    assert result["pooling"] == shipped["pooling"] and result["center_window"] == shipped["center_window"]
    assert result["optimizer_steps"] == 2
    # the ensemble of --seeds scores the checkpoint each run was scored with: the best one (splice) or, where the
    # config keeps none (genus: final weights), last.ckpt
    assert ensemble([str(tmp_path)])["test_acc"] == pytest.approx(result["test_acc"])


def test_cpu_time_budget_stops_training(tmp_path):
    data = write_gc_task(tmp_path / "gc.tsv", n=(64, 8, 8))
    budget = CPUTimeBudget(minutes=1e-6)
    trainer = pl.Trainer(max_steps=50, callbacks=[budget], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(DNAClassifier(TINY, num_labels=2), datamodule=LabelledDNADataModule(str(data), batch_size=8))
    assert trainer.global_step == 1 and budget.used_s > 0


def test_masked_lm_pretraining_learns_a_repeat(tmp_path):
    torch.manual_seed(0)
    unit = encode("ACGGTCAT")
    rows = [{"input_ids": unit.repeat(3).roll(int(s))} for s in torch.randint(0, 8, (64,))]
    loader = DataLoader(rows, batch_size=16, shuffle=True)
    module = MaskedLMModule(TINY, backbone="bimamba", lr=0.03, warmup_steps=5)
    batch = {"input_ids": torch.stack([r["input_ids"] for r in rows[:16]])}
    with torch.no_grad():
        before = float(module.mlm_loss(batch)[0])
    trainer = pl.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, loader)
    with torch.no_grad():
        after = float(module.mlm_loss(batch)[0])
    assert before > 2.0 and after < 0.5 * before, (before, after)
    with pytest.raises(ValueError, match="bidirectional"):
        MaskedLMModule(TINY, backbone="mamba")


def test_mlm_cli_exports_a_masked_lm(tmp_path):
    out = tmp_path / "mlm"
    main(["mlm", "--model.config.d_model", "16", "--model.config.n_layer", "1", "--model.config.ssm_cfg",
          "{d_state: 4}", "--data.seq_len", "32", "--data.batch_size", "4", "--data.samples_per_epoch", "8",
          "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.callbacks.dirpath", str(out), "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false"])
    model = DNAModel.from_pretrained(out)
    assert model.head_config.task == "mlm" and model.rc_equivariant


def test_centre_window_head_is_sized_for_its_positions_and_round_trips(tmp_path):
    # a position-aware readout for splice junctions: the features of centre +- 2, each position its own weights
    module = FinetuneClassifier(TINY, num_labels=3, pooling="center", center_window=2)
    net = module.model.eval()
    assert net.head.in_features == 5 * TINY.d_model
    ids = torch.stack([encode("ACGTACGTACG"), encode("TTGACCATGAC")])
    with torch.no_grad():
        out = net(ids)
    net.save_pretrained(tmp_path)
    back = DNAModel.from_pretrained(tmp_path).eval()
    assert back.head_config.center_window == 2
    with torch.no_grad():
        assert torch.equal(back(ids), out)


def test_seeds_fit_one_run_per_seed_and_score_their_ensemble(tmp_path):
    data = write_gc_task(tmp_path / "gc.tsv")
    args = ["--data.path", str(data), "--data.batch_size", "16", "--model.num_labels", "2",
            "--model.config.d_model", "16", "--model.config.n_layer", "1", "--model.config.ssm_cfg", "{d_state: 4}",
            "--model.init_from", "null", "--model.lr", "0.01", "--model.warmup_steps", "5",
            "--trainer.max_steps", "20", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.callbacks.dirpath", str(tmp_path / "export"), "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false"]
    result = main(["--seeds", "3", "4", *args])
    runs = [json.loads((Path(r) / "finetune_result.json").read_text()) for r in result["runs"]]
    assert [r["seed"] for r in runs] == [3, 4] and result["seeds"] == [3, 4]
    assert sorted(result["members"].values()) == pytest.approx(sorted(r["test_acc"] for r in runs))
    assert result["train_cpu_s"] == pytest.approx(sum(r["train_cpu_s"] for r in runs), abs=0.2)
    saved = json.loads((Path(result["runs"][0]).parent / "ensemble_result.json").read_text())
    assert saved["test_acc"] == pytest.approx(result["test_acc"])
    with pytest.raises(ValueError, match="two or more distinct seeds"):
        main(["--seeds", "3", *args])
    with pytest.raises(ValueError, match="two or more distinct seeds"):
        main(["--seeds", "3", "4", "--seed_everything=1", *args])
