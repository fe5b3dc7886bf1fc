"""The bad-input catalogue of the apps' command lines (issue 16, "Make it systematic").

Every ``python -m apps.genomics.{train,evaluate,predict,finetune}`` / ``apps.text.{train,evaluate,generate}`` case
below must end with one clear line on stderr (``error: ...``, naming the file / option and what is wrong), exit
status 2, no traceback, and nothing written: the working folder stays empty (no output file, no temp file, no
empty ``version_N`` run folder) and the inputs are untouched. Cases run in process through ``run_cli(main, argv)``
(the entry points' own path, without an interpreter start each); one runs the real entry point in a subprocess.
docs/errors.md lists them with their counts; keep the two in step.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apps.common.errors import run_cli
from apps.genomics import evaluate as g_evaluate
from apps.genomics import finetune as g_finetune
from apps.genomics import predict as g_predict
from apps.genomics import train as g_train
from apps.genomics.data import SAMPLE_FASTA, FastaReader
from apps.text import evaluate as t_evaluate
from apps.text import generate as t_generate
from apps.text import train as t_train
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
MAINS = {"genomics.train": g_train.main, "genomics.evaluate": g_evaluate.main, "genomics.predict": g_predict.main,
         "genomics.finetune": g_finetune.main, "text.train": t_train.main, "text.evaluate": t_evaluate.main,
         "text.generate": t_generate.main}
# lines that may come with the error line: progress bars, Lightning's start-up notes
NOISE = re.compile(r"\d+%\||^(Seed set to|GPU available|TPU available|HPU available|💡|`Trainer\()")

G_TINY = ["--model.config.d_model=16", "--model.config.n_layer=1", "--data.seq_len=32", "--data.batch_size=2",
          "--data.samples_per_epoch=2", "--data.warmup_min_len=null", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"]
T_TINY = ["--data.pattern=*.txt", "--data.seq_len=32", "--data.batch_size=2", "--data.val_tokens=64",
          "--model.config.d_model=16", "--model.config.n_layer=1", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=0", "--trainer.max_time=null", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false"]
LAST_ONLY = ("trainer:\n  callbacks:\n    - class_path: apps.common.LastCheckpoint\n"
             "      init_args: {every_n_train_steps: 1}\n")


def in_dir(folder: Path, fn):
    old = os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)
    try:
        return fn()
    finally:
        os.chdir(old)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """Good and bad inputs: exported models of each app, a Lightning checkpoint of each app's trainer, damaged
    copies, FASTA files with a bad character, a text corpus."""
    d = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    for name, vocab in (("dna", 12), ("text", 256)):
        MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=vocab,
                                     ssm_cfg={"layer": "Mamba1", "d_state": 4})).save_pretrained(d / name)
    shutil.copytree(d / "dna", d / "dna_corrupt")
    weights = d / "dna_corrupt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    (d / "bad.fa").write_text(">chr1\nACGTACGTAC\nACGTXCGTAC\n")  # line 3, column 5
    (d / "ok.fa").write_text(">chr1\n" + "ACGTACGTAC\n" * 30)
    bases = FastaReader(SAMPLE_FASTA).fetch("NC_007779.1", 10_000, 13_000)
    lines = [bases[i:i + 60] for i in range(0, len(bases), 60)]
    lines[1] = lines[1][:4] + "X" + lines[1][5:]
    (d / "bad_train.fa").write_text(">chr1\n" + "\n".join(lines) + "\n")  # line 3, column 5: in the train part
    corpus = d / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: hello world. " * 40)
    (d / "garbage.state").write_bytes(os.urandom(300))
    config = d / "last_only.yaml"
    config.write_text(LAST_ONLY)
    # one step of each trainer -> a real Lightning checkpoint of each app
    in_dir(d / "gen_run", lambda: g_train.main([*G_TINY, "--config", str(config)]))
    in_dir(d / "text_run", lambda: t_train.main(["fit", f"--data.paths=[{corpus}]", *T_TINY, "--config", str(config)]))
    paths = {"dir": str(d), "corpus": str(corpus), "dna_ckpt": str(d / "dna.ckpt"), "text_ckpt": str(d / "text.ckpt")}
    shutil.copy(d / "gen_run" / "runs" / "genomics" / "version_0" / "checkpoints" / "last.ckpt", paths["dna_ckpt"])
    shutil.copy(next((d / "text_run").rglob("last.ckpt")), paths["text_ckpt"])
    shutil.rmtree(d / "gen_run")
    shutil.rmtree(d / "text_run")
    (d / "truncated.ckpt").write_bytes(Path(paths["dna_ckpt"]).read_bytes()[:3000])
    return paths


# (id, command, argv with {dir} for the inputs folder, what the line must say)
CASES = [
    # python -m apps.genomics.train
    ("g-train-missing-fasta", "genomics.train", [*G_TINY, "--data.fasta={dir}/missing.fa"],
     r"FASTA file not found: .*missing\.fa"),
    ("g-train-fasta-bad-character", "genomics.train", [*G_TINY, "--data.fasta={dir}/bad_train.fa"],
     r"bad_train\.fa:3:5: character 'X' at position 64 \(0-based\) of record 'chr1' is not a DNA base"),
    ("g-train-ckpt-missing", "genomics.train", [*G_TINY, "--ckpt_path={dir}/missing.ckpt"],
     r"missing\.ckpt: no such checkpoint file"),
    ("g-train-ckpt-truncated", "genomics.train", [*G_TINY, "--ckpt_path={dir}/truncated.ckpt"],
     r"truncated\.ckpt: cannot read this Lightning checkpoint \(3,000 bytes\): it is corrupt or truncated"),
    ("g-train-ckpt-of-text", "genomics.train", [*G_TINY, "--ckpt_path={dir}/text.ckpt"],
     r"text\.ckpt: a checkpoint of another kind of run: it was saved with .*which DNADataModule does not take"),
    ("g-train-negative-seq-len", "genomics.train", [*G_TINY, "--data.seq_len=-5"],
     r"DNADataModule: seq_len must be at least 1, got -5"),
    # python -m apps.genomics.evaluate
    ("g-eval-ckpt-missing", "genomics.evaluate", ["--ckpt", "{dir}/nope", "--fasta", "{dir}/ok.fa"],
     r"nope: no such DNA language model folder or Lightning \.ckpt file"),
    ("g-eval-text-model", "genomics.evaluate", ["--ckpt", "{dir}/text", "--fasta", "{dir}/ok.fa"],
     r"text: vocab_size 256: not a DNA language model \(expected a vocabulary of 12\.\.16 ids\)"),
    ("g-eval-text-ckpt", "genomics.evaluate", ["--ckpt", "{dir}/text.ckpt", "--fasta", "{dir}/ok.fa"],
     r"text\.ckpt: a checkpoint of another kind of run: it was saved with vocab_size, which DNALM does not take"),
    ("g-eval-corrupt-safetensors", "genomics.evaluate", ["--ckpt", "{dir}/dna_corrupt", "--fasta", "{dir}/ok.fa"],
     r"dna_corrupt/model\.safetensors: cannot read this checkpoint \(100 bytes\): it is corrupt or truncated"),
    ("g-eval-truncated-ckpt", "genomics.evaluate", ["--ckpt", "{dir}/truncated.ckpt", "--fasta", "{dir}/ok.fa"],
     r"truncated\.ckpt: cannot read this Lightning checkpoint"),
    ("g-eval-fasta-bad-character", "genomics.evaluate", ["--ckpt", "{dir}/dna", "--fasta", "{dir}/bad.fa"],
     r"bad\.fa:3:5: character 'X' at position 14 \(0-based\) of record 'chr1' is not a DNA base"),
    ("g-eval-chunk-len-0", "genomics.evaluate", ["--ckpt", "{dir}/dna", "--fasta", "{dir}/ok.fa", "--chunk-len", "0"],
     r"--chunk-len must be at least 1, got 0"),
    ("g-eval-empty-split", "genomics.evaluate",
     ["--ckpt", "{dir}/dna", "--fasta", "{dir}/ok.fa", "--split", "val", "--valid-frac", "0"],
     r"ok\.fa \(held-out fractions --valid-frac 0\.0, --test-frac 0\.05\): no intervals in split 'val'"),
    # python -m apps.genomics.predict
    ("g-generate-negative-n", "genomics.predict", ["generate", "--ckpt", "{dir}/dna", "--prompt", "ACGT", "--n", "-5"],
     r"the number of bases to generate must be >= 0, got -5"),
    ("g-generate-text-model", "genomics.predict", ["generate", "--ckpt", "{dir}/text", "--prompt", "ACGT"],
     r"text: vocab_size 256: not a DNA model"),
    ("g-generate-prompt-bad-character", "genomics.predict", ["generate", "--ckpt", "{dir}/dna", "--prompt", "ACGTX"],
     r"character 'X' at position 4 is not a DNA base"),
    ("g-loglik-fasta-bad-character", "genomics.predict",
     ["loglik", "--ckpt", "{dir}/dna", "--fasta", "{dir}/bad.fa", "--out", "o.tsv"],
     r"bad\.fa:3: character 'X' at column 5 is not a DNA base"),
    ("g-loglik-out-folder-missing", "genomics.predict",
     ["loglik", "--ckpt", "{dir}/dna", "--fasta", "{dir}/ok.fa", "--out", "nodir/o.tsv"],
     r"nodir: no such folder to write o\.tsv in"),
    ("g-embed-out-suffix", "genomics.predict",
     ["embed", "--ckpt", "{dir}/dna", "--fasta", "{dir}/ok.fa", "--out", "emb.txt"],
     r"emb\.txt: embeddings go to \.npy or \.safetensors"),
    ("g-loglik-corrupt-safetensors", "genomics.predict",
     ["loglik", "--ckpt", "{dir}/dna_corrupt", "--fasta", "{dir}/ok.fa", "--out", "o.tsv"],
     r"model\.safetensors: cannot read this checkpoint \(100 bytes\)"),
    ("g-loglik-lightning-ckpt", "genomics.predict",
     ["loglik", "--ckpt", "{dir}/dna.ckpt", "--fasta", "{dir}/ok.fa", "--out", "o.tsv"],
     r"dna\.ckpt: a Lightning checkpoint; this command reads exported folders"),
    # python -m apps.genomics.finetune
    ("g-finetune-missing-data", "genomics.finetune", ["--data.path={dir}/missing.tsv", "--trainer.max_steps=1"],
     r"labelled data not found: .*missing\.tsv"),
    ("g-finetune-init-from-missing", "genomics.finetune", ["--model.init_from={dir}/nope", "--trainer.max_steps=1"],
     r"nope: no such folder \(init_from takes a save_pretrained directory\)"),
    ("g-finetune-init-from-corrupt", "genomics.finetune",
     ["--model.init_from={dir}/dna_corrupt", "--model.config.d_model=16", "--model.config.n_layer=1",
      "--trainer.max_steps=1"],
     r"dna_corrupt/model\.safetensors: cannot read this checkpoint \(100 bytes\)"),
    ("g-finetune-report-nothing", "genomics.finetune", ["report", "{dir}/corpus"],
     r"no finetune_result\.json below .*corpus"),
    # python -m apps.text.train
    ("t-train-missing-data", "text.train", ["fit", "--data.paths=[{dir}/missing]", *T_TINY],
     r"missing: no such file or folder"),
    ("t-train-ckpt-of-genomics", "text.train", ["fit", "--data.paths=[{dir}/corpus]", *T_TINY,
                                               "--ckpt_path={dir}/dna.ckpt"],
     r"dna\.ckpt: a checkpoint of another kind of run: it was saved with .*which ByteDataModule does not take"),
    ("t-train-ckpt-truncated", "text.train", ["fit", "--data.paths=[{dir}/corpus]", *T_TINY,
                                             "--ckpt_path={dir}/truncated.ckpt"],
     r"truncated\.ckpt: cannot read this Lightning checkpoint"),
    # python -m apps.text.evaluate
    ("t-eval-ckpt-missing", "text.evaluate", ["--ckpt", "{dir}/nope", "--files", "{dir}/corpus"],
     r"nope: no such byte-level model folder or Lightning \.ckpt file"),
    ("t-eval-dna-model", "text.evaluate", ["--ckpt", "{dir}/dna", "--files", "{dir}/corpus"],
     r"dna: vocab_size 12: not a byte-level model \(expected a vocabulary of 256\.\.259 ids\)"),
    ("t-eval-corrupt-safetensors", "text.evaluate", ["--ckpt", "{dir}/dna_corrupt", "--files", "{dir}/corpus"],
     r"model\.safetensors: cannot read this checkpoint \(100 bytes\): it is corrupt or truncated"),
    ("t-eval-files-missing", "text.evaluate", ["--ckpt", "{dir}/text", "--files", "{dir}/missing.txt"],
     r"missing\.txt: no such file or folder"),
    ("t-eval-negative-max-bytes", "text.evaluate",
     ["--ckpt", "{dir}/text", "--files", "{dir}/corpus", "--max-bytes", "-5"],
     r"--max-bytes must be at least 1 \(or left out: whole files\), got -5"),
    # python -m apps.text.generate
    ("t-generate-dna-model", "text.generate", ["--ckpt", "{dir}/dna", "--prompt", "hi"],
     r"dna: vocab_size 12: not a byte-level model"),
    ("t-generate-dna-ckpt", "text.generate", ["--ckpt", "{dir}/dna.ckpt", "--prompt", "hi"],
     r"dna\.ckpt: vocab_size 12: not a byte-level model"),
    ("t-generate-negative-max-bytes", "text.generate", ["--ckpt", "{dir}/text", "--prompt", "hi", "--max-bytes", "-5"],
     r"--max-bytes must be >= 0, got -5"),
    ("t-generate-garbage-cartridge", "text.generate",
     ["--ckpt", "{dir}/text", "--prompt", "hi", "--state", "{dir}/garbage.state"],
     r"garbage\.state: cannot read this state cartridge \(300 bytes\): it is corrupt or truncated"),
    ("t-generate-cartridge-missing", "text.generate",
     ["--ckpt", "{dir}/text", "--prompt", "hi", "--state", "{dir}/missing.state"],
     r"missing\.state: no such file"),
    ("t-generate-save-state-folder-missing", "text.generate",
     ["--ckpt", "{dir}/text", "--prompt", "hi", "--save-state", "nodir/x.state"],
     r"nodir: no such folder to write x\.state in"),
    ("t-generate-prompt-file-missing", "text.generate", ["--ckpt", "{dir}/text", "--prompt-file", "{dir}/missing.txt"],
     r"missing\.txt: No such file or directory"),
    ("t-generate-nan-temperature", "text.generate", ["--ckpt", "{dir}/text", "--prompt", "hi", "--temperature", "nan"],
     r"temperature must be a finite number, got nan"),
    ("t-generate-empty-prompt", "text.generate", ["--ckpt", "{dir}/text", "--prompt", ""],
     r"the prompt is empty"),
    ("t-generate-dna-draft", "text.generate", ["--ckpt", "{dir}/text", "--prompt", "hi", "--draft", "{dir}/dna"],
     r"dna: vocab_size 12: not a byte-level model"),
]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every input file's size and time; a FASTA's .fai index is left out (pyfaidx builds it beside the FASTA
    the first time it is read, a documented cache of FastaReader)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".fai"}


@pytest.mark.parametrize("command, argv, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_written(inputs, command, argv, says, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = snapshot(Path(inputs["dir"]))
    with pytest.raises(SystemExit) as exit_:
        run_cli(MAINS[command], [a.format(**inputs) for a in argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip() and not NOISE.search(line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    assert re.search(says, lines[0]), lines[0]
    written = [str(p.relative_to(work)) for p in work.rglob("*")]
    assert not [w for w in written if (work / w).is_file() or "version_" in w], written  # no files, no run folder
    assert snapshot(Path(inputs["dir"])) == before  # the inputs are untouched


def test_catalogue_counts():
    """docs/errors.md quotes these counts: keep them true."""
    per = {}
    for _, command, *_ in CASES:
        per[command] = per.get(command, 0) + 1
    assert per == {"genomics.train": 6, "genomics.evaluate": 8, "genomics.predict": 8, "genomics.finetune": 4,
                   "text.train": 3, "text.evaluate": 5, "text.generate": 10}
    assert len({c[0] for c in CASES}) == len(CASES) == 44


def test_invalid_utf8_prompt_generates_from_those_bytes(inputs, tmp_path, monkeypatch, capsys):
    """A --prompt holding bytes that are not UTF-8 (a Latin-1 terminal, a binary paste) is not an error: the model
    continues exactly those bytes. Python hands such argv bytes to the program as surrogate escapes
    (os.fsdecode); generate turns them back into the bytes."""
    monkeypatch.chdir(tmp_path)
    prompt = b"caf\xe9 \xff\xfe"
    given = []
    real = t_generate.stream_bytes

    def spy(model, prompt, *args, **kwargs):
        given.append(prompt)
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(t_generate, "stream_bytes", spy)
    run_cli(t_generate.main, ["--ckpt", inputs["dir"] + "/text", "--prompt", os.fsdecode(prompt), "--max-bytes", "12",
                              "--seed", "3"])
    out = capsys.readouterr()
    assert given == [prompt] and "error" not in out.err  # those bytes, not a re-encoding or a crash
    model = t_generate.load_model(inputs["dir"] + "/text")
    want = "".join(t_generate.stream_text(model, prompt, 12, temperature=0.8, top_p=0.95, seed=3))
    assert out.out == want + "\n"
    assert not list(tmp_path.iterdir())


# ---- the real entry point -------------------------------------------------------------------------------------

def entry_point(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    env.pop("HISS_DEBUG", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, timeout=300)


def test_train_entry_point_missing_data_leaves_no_run_folder(inputs, tmp_path):
    res = entry_point("apps.genomics.train", *G_TINY, f"--data.fasta={inputs['dir']}/missing.fa", cwd=tmp_path)
    err = res.stderr.decode()
    assert res.returncode == 2, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not NOISE.search(line)
             and "warn" not in line.lower()]  # the interpreter's own warnings (torch, Lightning) may come first
    assert lines[-1].startswith("error: FASTA file not found:") and "Traceback" not in err
    assert [line for line in lines if line.startswith("error:")] == lines[-1:]
    assert not [p for p in tmp_path.rglob("*") if p.is_file() or p.name.startswith("version_")]
