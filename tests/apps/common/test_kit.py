"""The app kit: classification on any network, head.json checkpoints, one load_model, callbacks, state-carrying
reads. Tiny models, CPU."""

from __future__ import annotations

import json
import math

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from apps.common import (
    ClassifierModule,
    CPUTimeBudget,
    HeadConfig,
    HeldOutEvaluation,
    load_model,
    pool,
    pooled_width,
    prefill,
    read_pieces,
)
from apps.common.classify import read_head_config, save_head_checkpoint
from apps.common.optim import adamw_warmup_cosine
from apps.common.paths import REPO_ROOT, default_checkpoints, repo_path
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_lm(vocab: int = 12) -> MambaLMHeadModel:
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=16, n_layer=2, vocab_size=vocab, ssm_cfg={"d_state": 4})).eval()


class MeanNet(nn.Module):
    """A toy sequence classifier with a saved head: embedding -> mean pool -> linear."""

    def __init__(self, head: HeadConfig, vocab: int = 8, d: int = 8):
        super().__init__()
        self.head_config = head
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, head.num_labels)

    def forward(self, ids, lengths=None):
        return self.out(pool(self.emb(ids), lengths, self.head_config.pooling))

    def save_pretrained(self, path):
        save_head_checkpoint(path, self.state_dict(), json.dumps({"vocab": 8}), self.head_config)

    @classmethod
    def from_pretrained(cls, path):
        from safetensors.torch import load_file

        net = cls(read_head_config(path))
        net.load_state_dict(load_file(str(path / "model.safetensors")))
        return net


def test_pool_matches_manual():
    f = torch.randn(2, 5, 3)
    lengths = torch.tensor([5, 2])
    assert torch.allclose(pool(f, lengths, "mean")[1], f[1, :2].mean(0))
    assert torch.allclose(pool(f, lengths, "max")[1], f[1, :2].amax(0))
    assert torch.equal(pool(f, lengths, "last")[1], f[1, 1])
    assert torch.equal(pool(f, lengths, "cls"), f[:, 0])
    assert torch.equal(pool(f, lengths, "center"), torch.stack([f[0, 2], f[1, 0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(f, lengths, "median")


def test_centre_window_concatenates_the_positions_around_each_rows_centre():
    f = torch.randn(2, 9, 3)
    lengths = torch.tensor([9, 5])  # centres 4 and 2
    got = pool(f, lengths, "center", window=2)
    assert got.shape == (2, 15)
    assert torch.equal(got, torch.stack([f[0, 2:7].flatten(), f[1, 0:5].flatten()]))
    assert torch.equal(pool(f, lengths, "center", window=0), pool(f, lengths, "center"))
    with pytest.raises(ValueError, match="5 positions needs rows at least that long, got a row of 4"):
        pool(f, torch.tensor([9, 4]), "center", window=2)
    with pytest.raises(ValueError, match="around the centre only"):
        pool(f, lengths, "mean", window=1)
    with pytest.raises(ValueError, match="center_window"):
        HeadConfig(pooling="mean", center_window=2)
    assert pooled_width(HeadConfig(pooling="center", center_window=5), 8) == 88


def test_head_config_checks_and_checkpoint_round_trip(tmp_path):
    with pytest.raises(ValueError, match="task"):
        HeadConfig(task="regression")
    with pytest.raises(ValueError, match="2 label names for num_labels=3"):
        HeadConfig(num_labels=3, labels=["a", "b"])
    net = MeanNet(HeadConfig(num_labels=3, labels=["a", "b", "c"]))
    net.save_pretrained(tmp_path / "clf")
    back = load_model(tmp_path / "clf", head_model=MeanNet)
    assert back.head_config == net.head_config and not back.training
    ids = torch.randint(0, 8, (2, 5))
    assert torch.equal(back(ids), net(ids))
    (tmp_path / "clf" / "head.json").write_text("{not json")
    with pytest.raises(ValueError, match="head.json: invalid head config"):
        read_head_config(tmp_path / "clf")


def test_load_model_reads_each_kind_and_names_what_is_wrong(tmp_path):
    lm = tiny_lm()
    lm.save_pretrained(tmp_path / "lm")
    ids = torch.randint(0, 12, (1, 9))
    assert torch.equal(load_model(tmp_path / "lm")(ids).logits, lm(ids).logits)
    with pytest.raises(ValueError, match="vocab_size 12: not a byte model"):
        load_model(tmp_path / "lm", vocab_range=(256, 259), what="byte model")
    MeanNet(HeadConfig(num_labels=2)).save_pretrained(tmp_path / "clf")
    with pytest.raises(ValueError, match="classifier checkpoint .*needs a language model"):
        load_model(tmp_path / "clf")
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "run.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match="Lightning checkpoint"):
        load_model(tmp_path / "run.ckpt")


def batches(n: int, soft: bool = False):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, 8, (6,), generator=g)
        y = int(ids.float().mean() > 3.5)
        rows.append({"inputs": ids, "labels": torch.eye(2)[y] if soft else torch.tensor(y)})
    return DataLoader(rows, batch_size=8)


@pytest.mark.parametrize("soft", [False, True])
def test_classifier_module_trains_any_network_handed_to_it(tmp_path, soft):
    torch.manual_seed(0)
    module = ClassifierModule(MeanNet(HeadConfig(num_labels=2)), lr=3e-2, warmup_steps=1, weight_decay=0.0)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, batches(32, soft), batches(16, soft))
    assert trainer.callback_metrics["val/acc"] > 0.8
    probs = torch.cat(trainer.predict(module, batches(4)))
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(-1), torch.ones(4))


def test_classifier_module_refuses_data_with_another_class_count(tmp_path):
    class DM(pl.LightningDataModule):
        labels = ["a", "b", "c"]

        def train_dataloader(self):
            return batches(8)

    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="the model has 2 classes but the data has 3"):
        trainer.fit(ClassifierModule(MeanNet(HeadConfig(num_labels=2))), datamodule=DM())


def test_optimizer_has_no_decay_groups_and_warmup_cosine():
    module = ClassifierModule(MeanNet(HeadConfig(num_labels=2)))
    cfg = adamw_warmup_cosine(module, module.model, lr=1.0, weight_decay=0.1, warmup_steps=2, total_steps=10,
                              min_lr_ratio=0.1)
    decay, no_decay = cfg["optimizer"].param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert any(p is module.model.out.bias for p in no_decay["params"])  # biases never decay
    sched = cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(cfg["optimizer"].param_groups[0]["lr"])
        cfg["optimizer"].step()
        sched.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0) and lrs[-1] < lrs[2]


def test_cpu_time_budget_survives_a_resume():
    budget = CPUTimeBudget(minutes=1.0)
    budget.used_s = 42.0
    again = CPUTimeBudget(minutes=1.0)
    again.load_state_dict(budget.state_dict())
    assert again.used_s == 42.0


def test_annealing_budget_runs_the_cosine_over_cpu_time_spent():
    """CPUTimeBudget(anneal=True): after the step-based warm-up the rate follows the share of the budget spent
    (1 -> min ratio), whatever the step count; a fit with no step limit ends at the end of that schedule."""
    budget = CPUTimeBudget(minutes=1.0, anneal=True)
    module = ClassifierModule(MeanNet(HeadConfig(num_labels=2)))
    trainer = pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[budget])
    module.trainer = trainer
    cfg = adamw_warmup_cosine(module, module.model, lr=1.0, weight_decay=0.0, warmup_steps=2, min_lr_ratio=0.1)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    seen = []
    for used in (0.0, 0.0, 0.0, 30.0, 60.0, 90.0):  # two warm-up steps, then 0, 1/2, all, past the budget
        budget.used_s = used
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(0.5) and seen[1] == pytest.approx(1.0) and seen[2] == pytest.approx(1.0)
    assert seen[3] == pytest.approx(1.0) and seen[4] == pytest.approx(0.55) and seen[5] == pytest.approx(0.1)
    assert seen[6] == pytest.approx(0.1) and budget.fraction == 1.0
    # with a step count too, the cosine follows whichever share is larger: steps here, then the budget
    budget.used_s = 0.0
    cfg = adamw_warmup_cosine(module, module.model, lr=1.0, weight_decay=0.0, warmup_steps=0, total_steps=4,
                              min_lr_ratio=0.1)
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    seen = []
    for used in (0.0, 6.0, 54.0):  # step shares 1/4, 1/2, 3/4 against budget shares 0, 0.1, 0.9
        budget.used_s = used
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))  # steps lead
    assert seen[1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # step share 1/2 > budget 0.1
    assert seen[2] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.9)))  # the budget leads
    # an unbounded fit stops when the budget is spent, at the schedule's end
    tiny = CPUTimeBudget(minutes=0.01, anneal=True)
    module = ClassifierModule(MeanNet(HeadConfig(num_labels=2)), lr=1e-3, warmup_steps=2)
    trainer = pl.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[tiny])
    trainer.fit(module, batches(16))
    assert tiny.used_s >= 0.6 and trainer.global_step > 2
    assert 0.1e-3 <= trainer.optimizers[0].param_groups[0]["lr"] < 0.15e-3  # annealed (the last step's share < 1)
    with pytest.raises(ValueError, match="minutes must be > 0"):
        CPUTimeBudget(minutes=0)


class CountTokens(HeldOutEvaluation):
    def evaluate(self, trainer, pl_module):
        return {"metric": "tokens", "value": 7.0, "protocol": "counted"}


def test_held_out_evaluation_writes_its_result_once_fit_ends(tmp_path, capsys):
    cb = CountTokens()
    module = ClassifierModule(MeanNet(HeadConfig(num_labels=2)))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(module, batches(16))
    saved = json.loads((tmp_path / "heldout.json").read_text())
    assert saved == cb.result and saved["value"] == 7.0 and saved["step"] == 2 and saved["split"] == "test"
    assert "held-out tokens (test, counted): 7.0000" in capsys.readouterr().out


def test_read_pieces_and_prefill_equal_one_pass():
    model = tiny_lm()
    ids = torch.randint(0, 12, (2, 23))
    whole = model(ids, return_state=True)
    logits = torch.cat([out.logits for _, out in read_pieces(model, ids, chunk_len=5)], dim=1)
    torch.testing.assert_close(logits, whole.logits, atol=1e-5, rtol=1e-5)
    state = prefill(model, ids, chunk_len=4)
    nxt = torch.randint(0, 12, (2, 1))
    torch.testing.assert_close(model(nxt, state=state).logits, model(torch.cat([ids, nxt], 1)).logits[:, -1:],
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing to read"):
        prefill(model, ids[:, :0])


def test_repo_paths_resolve_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repo_path("datasets/samples/splice_uci.tsv.gz") == REPO_ROOT / "datasets/samples/splice_uci.tsv.gz"
    assert repo_path("nope.txt").name == "nope.txt"
    found = default_checkpoints("genomics", shipped="x")
    assert found[0] == tmp_path / "runs" / "genomics" / "pretrained" and found[-1].name == "x"
