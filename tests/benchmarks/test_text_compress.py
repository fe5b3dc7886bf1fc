"""benchmarks.text_compress: every coder is charged for every byte (a uniform model costs exactly 8 bits per
byte, first bytes included), the compressor columns measure the same files, and the default groups are the
held-out split of the pretraining config."""

import gzip

import pytest
import torch

from benchmarks import text_compress as tc
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def uniform_model(tmp_path):
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"layer": "Mamba1"}))
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all zero: p = 1/256 for every byte
    model.save_pretrained(tmp_path / "uniform")
    return tmp_path / "uniform"


def test_uniform_model_costs_eight_bits_per_byte_and_compressors_see_the_same_bytes(tmp_path, uniform_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [b"the quick brown fox " * 40, b"jumps over the lazy dog " * 30, b"x"]
    for i, t in enumerate(texts):
        (corpus / f"f{i}.txt").write_bytes(t)
    doc = tmp_path / "doc.md"
    (g,) = tc.main(["--ckpt", str(uniform_model), "--group", f"toy={corpus}", "--doc", str(doc)])
    assert g.bytes == sum(map(len, texts))
    assert g.model["hiss"] == pytest.approx(8.0, abs=1e-4)
    joined = len(gzip.compress(b"".join(texts), compresslevel=9, mtime=0))
    assert g.joined["gzip -9"] == pytest.approx(8 * joined / g.bytes)
    assert g.per_file["gzip -9"] > g.joined["gzip -9"]  # three headers, no shared dictionary
    text = doc.read_text()
    assert "<!-- text_compress:begin -->" in text and "| toy | 3 | " in text
    assert "hiss below every compressor? toy: no" in text  # 8 bits/byte loses to any compressor on repeats


def test_default_groups_are_the_pretraining_test_split(tmp_path, monkeypatch):
    cfg = tmp_path / "pretrain.yaml"
    for corpus in ("a", "b"):
        for i in range(10):
            (tmp_path / corpus).mkdir(exist_ok=True)
            (tmp_path / corpus / f"{i}.txt").write_text(f"{corpus}{i}")
    cfg.write_text(f"data:\n  paths: [{tmp_path / 'a'}, {tmp_path / 'b'}]\n  valid_fraction: 0.1\n"
                   "  test_fraction: 0.2\n")
    groups = tc.heldout_groups(cfg)
    assert [g.name for g in groups] == ["a (held-out files)", "b (held-out files)"]
    from apps.text.data import ByteDataModule

    dm = ByteDataModule(paths=[str(tmp_path / "a"), str(tmp_path / "b")], valid_fraction=0.1, test_fraction=0.2)
    assert sorted(f for g in groups for f in g.files) == sorted(str(d.path) for d in dm.split_docs()["test"])
    with pytest.raises(SystemExit, match="missing"):
        cfg.write_text(f"data:\n  paths: [{tmp_path / 'nope'}]\n  valid_fraction: 0.1\n  test_fraction: 0.2\n")
        tc.heldout_groups(cfg)
