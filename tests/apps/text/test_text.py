"""apps/text: byte data, training (chunked, TBPTT across batches), exact evaluation, UTF-8-safe streaming,
state cartridges, speculative decoding through the app (its exactness tests: tests/core/test_speculative.py),
MambaByte (mamba_ssm format) checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from apps.text.data import (
    BOS,
    EOS,
    SAMPLE_DIR,
    ByteCorpus,
    Doc,
    Streams,
    encode,
    enwik8_splits,
    list_files,
    pg19_splits,
    split_files,
)
from apps.text.evaluate import evaluate_files
from apps.text.generate import (
    Utf8Stream,
    byte_surprisal,
    load_cartridge,
    load_model,
    prefill,
    save_cartridge,
    stream_bytes,
    stream_text,
)
from apps.text.model import TextLMModule
from ssm_core import MambaConfig, MambaLMHeadModel, SpecStats

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(vocab: int = 256, d: int = 32, n: int = 2, seed: int = 0) -> MambaLMHeadModel:
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(d_model=d, n_layer=n, vocab_size=vocab, ssm_cfg={"d_state": 8})).eval()


# --- data -------------------------------------------------------------------------------------------------


def write_corpus(root: Path, n: int = 6) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        f = root / f"doc{i}.txt"
        f.write_bytes((f"document {i}: héllo wörld ✓ " * (20 + i)).encode() + bytes([0xFF, 0xFE, i]))
        files.append(f)
    (root / ".hidden").write_text("skip me")
    return files


def test_bundled_sample_is_real_and_small():
    files = list_files([SAMPLE_DIR], "*.rst.txt")
    assert len(files) >= 20
    assert sum(f.stat().st_size for f in files) < 2_000_000
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in (SAMPLE_DIR / "LICENSE").read_text()
    train, valid, test = split_files(files)
    assert set(train).isdisjoint(valid) and set(train).isdisjoint(test) and set(valid).isdisjoint(test)
    assert sorted(train + valid + test) == sorted(files)


def test_files_folders_split_and_errors(tmp_path):
    files = write_corpus(tmp_path / "c")
    assert list_files([tmp_path / "c"]) == files  # sorted, hidden files skipped
    with pytest.raises(FileNotFoundError, match="nope"):
        list_files([tmp_path / "nope"])
    with pytest.raises(FileNotFoundError, match=r"no files matching '\*.md'"):
        list_files([tmp_path / "c"], "*.md")
    a = split_files(files, 0.2, 0.2)
    assert a == split_files(list(reversed(files)), 0.2, 0.2)  # by name, not by listing order
    assert all(len(s) >= 1 for s in a)
    with pytest.raises(ValueError, match="at least 3 files"):
        split_files(files[:2])


def test_split_is_the_same_wherever_the_corpus_lives(tmp_path):
    import shutil
    a = write_corpus(tmp_path / "one" / "corpus", 12)
    shutil.copytree(tmp_path / "one", tmp_path / "elsewhere" / "deeper")
    b = list_files([tmp_path / "elsewhere" / "deeper" / "corpus"])
    names = lambda split: [[f.name for f in part] for part in split]  # noqa: E731
    assert names(split_files(a, 0.2, 0.2, roots=[tmp_path / "one" / "corpus"])) == \
        names(split_files(b, 0.2, 0.2, roots=[tmp_path / "elsewhere" / "deeper" / "corpus"]))


def test_corpus_reads_bytes_and_frames_documents(tmp_path):
    files = write_corpus(tmp_path / "c", 3)
    raw = [f.read_bytes() for f in files]
    plain = ByteCorpus([Doc(f) for f in files])
    assert plain.read(0, len(plain)).tolist() == list(b"".join(raw))  # invalid UTF-8 is just bytes
    framed = ByteCorpus([Doc(f) for f in files], specials=True)
    want = [t for r in raw for t in [BOS, *r, EOS]]
    assert len(framed) == len(want)
    for start, n in [(0, len(want)), (1, 5), (len(raw[0]) - 3, 10), (len(raw[0]) + 1, 3), (len(want) - 4, 10)]:
        assert framed.read(start, n).tolist() == want[start : start + n]
    assert framed.doc_tokens(1).tolist() == [BOS, *raw[1], EOS]


def test_pg19_and_enwik8_layouts(tmp_path):
    for split in ("train", "validation", "test"):
        write_corpus(tmp_path / "pg19" / split, 2)
    s = pg19_splits(tmp_path / "pg19")
    assert [len(s[k]) for k in ("train", "val", "test")] == [2, 2, 2]
    assert s["val"][0].path.parent.name == "validation"
    with pytest.raises(FileNotFoundError, match="validation"):
        pg19_splits(tmp_path / "pg19" / "train")
    data = bytes(range(256)) * 40
    (tmp_path / "enwik8").write_bytes(data)
    e = enwik8_splits(tmp_path / "enwik8", n_valid=1000, n_test=500)
    got = [ByteCorpus(e[k]).read(0, 10**6).tolist() for k in ("train", "val", "test")]
    assert got == [list(data[:-1500]), list(data[-1500:-500]), list(data[-500:])]


def test_streams_are_consecutive_batches(tmp_path):
    files = write_corpus(tmp_path / "c", 3)
    corpus = ByteCorpus([Doc(f) for f in files])
    ds = Streams(corpus, seq_len=16, batch_size=3)
    b0, b1 = ds[0], ds[1]
    assert b0["reset"] and not b1["reset"]
    assert torch.equal(b0["labels"][:, -1], b1["input_ids"][:, 0])  # batch 1 continues batch 0, row by row
    assert torch.equal(b0["input_ids"][1, 0], corpus.read(ds.row_len, 1)[0])


def test_tbptt_carries_state_across_batches(tmp_path):
    """Two consecutive stream batches with the carried state give the same second-batch loss as reading both
    batches' rows in one pass (the state is the exact recurrence; detach only cuts gradients)."""
    files = write_corpus(tmp_path / "c", 3)
    ds = Streams(ByteCorpus([Doc(f) for f in files]), seq_len=24, batch_size=2)
    module = TextLMModule(MambaConfig(d_model=16, n_layer=1, vocab_size=256, ssm_cfg={"d_state": 4}), chunk_len=8)
    module.log = lambda *a, **k: None  # no trainer attached
    b0, b1 = ds[0], ds[1]
    module.training_step(b0, 0)
    loss1 = module.training_step(b1, 1)
    ids = torch.cat([b0["input_ids"], b1["input_ids"]], 1)
    labels = torch.cat([b0["labels"], b1["labels"]], 1)
    logits = module.model(ids).logits[:, 24:, :256]
    want = F.cross_entropy(logits.flatten(0, 1), labels[:, 24:].flatten())
    torch.testing.assert_close(loss1, want, rtol=1e-5, atol=1e-5)
    fresh = module.training_step({**b1, "reset": True}, 0)
    assert not torch.allclose(fresh, want)  # without the carried state the loss differs


# --- training and evaluation --------------------------------------------------------------------------------


def test_train_cli_smoke_then_evaluate(tmp_path, capsys):
    from apps.text.train import main

    write_corpus(tmp_path / "c", 5)
    root = tmp_path / "run"
    cli = main(["fit", f"--data.paths=[{tmp_path / 'c'}]", "--data.pattern=*.txt", "--data.seq_len=64",
                "--data.batch_size=2", "--data.val_tokens=256", "--data.tbptt=true", "--model.chunk_len=16",
                "--model.config.d_model=16", "--model.config.n_layer=1", "--trainer.max_steps=3",
                "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.max_time=null",
                f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}",
                "--trainer.enable_progress_bar=false"])
    assert cli.trainer.global_step == 3
    log_dir = Path(cli.trainer.log_dir)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    pretrained = root / "pretrained"  # runs/<app>/pretrained: <default_root_dir>/pretrained
    held = json.loads((log_dir / "heldout.json").read_text())
    assert held["metric"] == "bits/byte" and 0 < held["value"] < 9 and "whole files" in held["protocol"]
    # evaluate: the CLI's number equals a one-shot forward over each held-out file
    test_files = held["files"]
    result = evaluate_files(pretrained, test_files, chunk_len=7)
    model = load_model(pretrained)
    bits, n = 0.0, 0
    for f in test_files:
        ids = encode(Path(f).read_bytes())
        nll = F.cross_entropy(model(ids[None, :-1]).logits[0, :, :256], ids[1:], reduction="sum")
        bits, n = bits + float(nll) / math.log(2), n + len(ids) - 1
    assert result["total"] == pytest.approx(bits / n, rel=1e-4)
    assert result["total"] == pytest.approx(held["value"], rel=1e-4)
    from apps.text.evaluate import main as eval_main

    eval_main(["--ckpt", str(pretrained), "--files", *test_files])
    assert "bits/byte" in capsys.readouterr().out


# --- generation ---------------------------------------------------------------------------------------------


def test_utf8_stream_never_emits_half_a_character():
    text = "aé✓😀z"
    data = text.encode()
    dec = Utf8Stream()
    pieces = [dec.feed([b]) for b in data]
    assert "".join(pieces) + dec.flush() == text
    assert pieces[1] == "" and pieces[2] == "é"  # the first byte of é is held back
    assert all("\ufffd" not in p for p in pieces)
    dec = Utf8Stream()
    out = dec.feed([0x61, 0xFF, 0x62, 0xE2, 0x9C]) + dec.feed([BOS]) + dec.flush()
    assert out == "a\ufffdb\ufffd"  # invalid byte -> U+FFFD, dangling partial character at the end -> U+FFFD


def test_stream_text_is_whole_characters_and_matches_bytes():
    model = tiny()
    pieces = list(stream_text(model, "héllo", 60, temperature=1.0, seed=3))
    raw = bytes(stream_bytes(model, "héllo", 60, temperature=1.0, seed=3))
    assert "".join(pieces) == raw.decode("utf-8", errors="replace")
    for p in pieces:
        p.encode("utf-8")  # each piece is valid text on its own (no surrogates / split characters)


def test_cartridge_continuation_equals_one_go(tmp_path):
    model = tiny(seed=1)
    doc, more = ("The quick brown fox " * 30).encode(), b"jumps"
    path = tmp_path / "doc.state"
    save_cartridge(path, model, doc, chunk_len=64)
    state = load_cartridge(path, model)
    assert state.seqlen_offset == len(doc)
    a = list(stream_bytes(model, more, 40, temperature=0.9, top_k=50, seed=7, state=state))
    b = list(stream_bytes(model, doc + more, 40, temperature=0.9, top_k=50, seed=7))
    assert a == b
    s = byte_surprisal(model, more, state=state)
    full = byte_surprisal(model, doc + more)
    assert math.isnan(s[0]) and s[1:] == pytest.approx(full[-len(more) + 1:], rel=1e-4, abs=1e-4)
    with pytest.raises(ValueError, match="at least one more"):
        list(stream_bytes(model, b"", 5, state=state))
    with pytest.raises(ValueError, match="different model"):
        load_cartridge(path, tiny(d=16))
    assert prefill(model, encode(doc), chunk_len=1000).seqlen_offset == len(doc)


def test_mambabyte_checkpoint_in_mamba_ssm_format(tmp_path):
    """A MambaByte-style directory as mamba_ssm writes it: config.json with mamba_ssm's fields (vocab 256,
    ssm_cfg {}) and pytorch_model.bin with its key names (lm_head.weight saved too, tied)."""
    torch.manual_seed(0)
    cfg = {"d_model": 32, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    ref = MambaLMHeadModel(MambaConfig(**cfg)).eval()
    sd = ref.state_dict()
    assert {"backbone.embedding.weight", "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.1.mixer.A_log",
            "backbone.layers.0.mixer.x_proj.weight", "backbone.layers.0.mixer.dt_proj.bias", "backbone.norm_f.weight",
            "lm_head.weight", "backbone.layers.0.norm.weight", "backbone.layers.0.mixer.conv1d.weight"} <= set(sd)
    d = tmp_path / "mambabyte"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    torch.save({k: v.clone() for k, v in sd.items()}, d / "pytorch_model.bin")
    model = load_model(d)
    ids = encode(b"Hello, MambaByte!")[None]
    torch.testing.assert_close(model(ids).logits, ref(ids).logits)
    assert list(stream_bytes(model, "Hi", 20, temperature=0)) == list(stream_bytes(ref, "Hi", 20, temperature=0))
    (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 16}))
    with pytest.raises(ValueError):  # weights no longer match the config
        load_model(d)
    big = tmp_path / "bpe"
    MambaLMHeadModel(MambaConfig(d_model=8, n_layer=1, vocab_size=1000)).save_pretrained(big)
    with pytest.raises(ValueError, match="not a byte-level model"):
        load_model(big)


# --- speculative decoding -----------------------------------------------------------------------------------


def test_speculative_with_mamba_models_and_eos():
    """Real byte Mambas, sampling with top-k/top-p: runs, respects the budget, stops at EOS."""
    target, draft = tiny(259, d=32, n=2, seed=0), tiny(259, d=16, n=1, seed=3)
    stats = SpecStats()
    out = list(stream_bytes(target, "abc", 50, temperature=0.9, top_k=40, top_p=0.95, seed=0, draft=draft, k=3,
                            stats=stats))
    assert len(out) <= 50 and all(t < 259 for t in out) and stats.drafted > 0
    with torch.no_grad():  # make EOS overwhelmingly likely: generation stops at once, EOS not emitted
        target.lm_head.weight[EOS] += 50 * target.backbone.embedding.weight.std()
    assert list(stream_bytes(target, "abc", 50, temperature=0.0, draft=draft, k=3)) == []


def test_shipped_model_is_the_default_of_generate_and_evaluate(tmp_path, monkeypatch, capsys):
    import apps.common.paths as paths
    from apps.text import generate as gen

    assert (gen.SHIPPED / "model.safetensors").stat().st_size <= 20_000_000  # the size cap
    monkeypatch.chdir(tmp_path)  # no runs/text/pretrained here or under the (patched) repository root
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path)
    assert gen.default_model() == gen.SHIPPED
    (tmp_path / "runs" / "text" / "pretrained").mkdir(parents=True)
    gen.load_model(gen.SHIPPED).save_pretrained(tmp_path / "runs" / "text" / "pretrained")
    assert gen.default_model().resolve() == (tmp_path / "runs" / "text" / "pretrained").resolve()  # yours first
    with pytest.raises(FileNotFoundError, match="nope: no such byte-level model"):
        gen.load_model(gen.default_model(tmp_path / "nope"))
    draft = gen.load_model(gen.SHIPPED_DRAFT)
    target = gen.load_model(gen.SHIPPED)
    assert sum(p.numel() for p in draft.parameters()) * 4 < sum(p.numel() for p in target.parameters())
    gen.main(["--prompt", "The tutorial", "--max-bytes", "24", "--seed", "0", "--draft", str(gen.SHIPPED_DRAFT)])
    err = capsys.readouterr().err
    assert "[24 bytes in" in err and "acceptance" in err  # the shipped pair decodes speculatively
    doc = tmp_path / "doc.txt"
    doc.write_text("The Python tutorial explains how to define functions. " * 8)
    r = evaluate_files(None, [doc])
    assert r["total"] < 4.0  # a trained model: far below the 8 bits of a uniform byte distribution
