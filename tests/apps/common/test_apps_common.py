"""apps.common: the glue every app shares (schedule, weight-decay groups, baselines, chunked evaluation, CLI)."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from apps.common import CausalLMModule, ExportPretrained, sequence_nll, transformer_like
from apps.common.baselines import count_parameters
from apps.common.cli import cli_main
from apps.common.optim import param_groups, warmup_cosine
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = MambaConfig(d_model=32, n_layer=2, vocab_size=7, ssm_cfg={"d_state": 8})


def test_warmup_cosine_shape():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(500, 10, None, 0.1) == 1.0


def test_param_groups_skip_decay_on_ssm_parameters():
    model = MambaLMHeadModel(TINY)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("A_log") for n in no_decay_names) and any(n.endswith(".D") for n in no_decay_names)
    assert all(p.ndim >= 2 for p in decay["params"])
    n_total = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_total


@pytest.mark.parametrize("d_model,n_layer", [(64, 2), (128, 4)])
def test_transformer_like_matches_size(d_model, n_layer):
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=16)
    t = transformer_like(cfg)
    assert t.attn_layer_idx == list(range(n_layer))
    step = 3 * d_model * n_layer * 128  # one GatedMLP size step
    assert abs(count_parameters(t) - count_parameters(cfg)) <= step / 2
    logits = MambaLMHeadModel(t)(torch.randint(0, 16, (1, 12))).logits
    assert logits.shape == (1, 12, t.padded_vocab_size)


def test_sequence_nll_is_exact_across_pieces():
    torch.manual_seed(0)
    model = MambaLMHeadModel(TINY)
    tokens = torch.randint(0, 7, (2, 50))
    nll = sequence_nll(model, tokens, chunk_len=16, vocab_size=7)
    ref = F.cross_entropy(model(tokens[:, :-1]).logits[..., :7].transpose(1, 2), tokens[:, 1:], reduction="none")
    assert nll.shape == (2, 49)
    torch.testing.assert_close(nll, ref, rtol=1e-5, atol=1e-5)
    assert model.training  # restored


class _Random(pl.LightningDataModule):
    def __init__(self, seq_len: int = 16, n: int = 32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 7, (n, seq_len + 1), generator=g)
        self.items = [{"input_ids": r[:-1], "labels": r[1:]} for r in ids]

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=8)

    def val_dataloader(self):
        return DataLoader(self.items[:8], batch_size=8)


def test_lightning_fit_with_chunks_exports_pretrained(tmp_path):
    module = CausalLMModule(TINY, chunk_len=8, warmup_steps=2)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ExportPretrained(str(tmp_path / "export"))], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=_Random())
    loaded = MambaLMHeadModel.from_pretrained(str(tmp_path / "export"))
    ids = torch.randint(0, 7, (1, 9))
    torch.testing.assert_close(loaded(ids).logits, module.model(ids).logits)
    assert math.isfinite(trainer.callback_metrics["val/bits_per_token"].item())


def test_cli_implies_fit(tmp_path):
    cfg = tmp_path / "default.yaml"
    cfg.write_text(
        "model:\n  config:\n    d_model: 32\n    n_layer: 1\n    vocab_size: 7\n"
        "trainer:\n  max_steps: 2\n  accelerator: cpu\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n"
        f"  default_root_dir: {tmp_path}\n")
    cli = cli_main(CausalLMModule, _Random, cfg, args=["--trainer.max_steps=1"])
    assert cli.trainer.global_step == 1
    assert cli.model.config.d_model == 32
