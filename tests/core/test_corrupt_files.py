"""Corrupt, truncated and foreign files given to ssm_core's loaders, and saves interrupted midway
(issue 16, items 5 and the save faults).

Loaders (from_pretrained, load_state, read_safetensors) must name the file and say what is wrong;
save_pretrained / save_state killed or failing midway must leave the previous files loadable and unchanged.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ssm_core import CorruptFileError, MambaConfig, MambaLMHeadModel, load_state, read_safetensors, save_state
from ssm_core.io import atomic_write, read_safetensors_metadata, remove_stale_temp_files

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
CFG = MambaConfig(d_model=16, n_layer=2, vocab_size=10, ssm_cfg={"d_state": 8})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLMHeadModel(CFG).eval()


@pytest.fixture
def ckpt(model, tmp_path):
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    return d


@pytest.fixture
def cartridge(model, tmp_path):
    path = tmp_path / "prompt.state"
    with torch.no_grad():
        save_state(path, model(torch.ones(1, 4, dtype=torch.long), return_state=True).state, CFG)
    return path


def truncate_half(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def zip_file(p: Path):
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")


# how a file gets damaged -> what the message must say
DAMAGE = {
    "truncated-half": (truncate_half, "it is corrupt or truncated"),
    "truncated-to-10-bytes": (lambda p: p.write_bytes(p.read_bytes()[:10]), "it is corrupt or truncated"),
    "empty": (lambda p: p.write_bytes(b""), "the file is empty"),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(4096)), "it is corrupt or truncated"),
    "garbage-header": (lambda p: p.write_bytes(p.read_bytes()[:8] + b"x" * 200), "it is corrupt or truncated"),
    "a-zip-not-safetensors": (zip_file, r"it is a zip archive \(a torch.save file\?\), not safetensors"),
}


@pytest.mark.parametrize("damage, says", DAMAGE.values(), ids=list(DAMAGE))
def test_damaged_checkpoint_names_the_file(ckpt, damage, says):
    weights = ckpt / "model.safetensors"
    damage(weights)
    pattern = rf"^{re.escape(str(weights))}: cannot read this checkpoint \([\d,]+ bytes\): {says}"
    with pytest.raises(CorruptFileError, match=pattern):
        MambaLMHeadModel.from_pretrained(ckpt)


@pytest.mark.parametrize("damage, says", DAMAGE.values(), ids=list(DAMAGE))
def test_damaged_cartridge_names_the_file(cartridge, damage, says):
    damage(cartridge)
    pattern = rf"^{re.escape(str(cartridge))}: cannot read this state cartridge .*{says}"
    with pytest.raises(CorruptFileError, match=pattern):
        load_state(cartridge, CFG)


def test_corrupt_file_error_is_a_value_error():
    assert issubclass(CorruptFileError, ValueError)  # command lines and demos report ValueErrors as one line


def test_read_safetensors_missing_or_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^{tmp_path / 'nope.safetensors'}: no such file$"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError, match=rf"^{tmp_path}: is a directory, not a file$"):
        read_safetensors(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_state(tmp_path / "nope.state", CFG)


def test_read_safetensors_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.arange(6.0).view(2, 3)}, str(path), metadata={"k": "v"})
    out = read_safetensors(path)
    assert torch.equal(out["a"], torch.arange(6.0).view(2, 3)) and read_safetensors_metadata(path) == {"k": "v"}


def test_cartridge_with_foreign_contents(tmp_path):
    path = tmp_path / "x.state"
    save_file({"weights": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=rf"^{path}: not a hiss state cartridge \(format=None"):
        load_state(path, CFG)
    meta = {"format": "hiss-state-v1", "config": CFG.to_json()}
    save_file({"weights": torch.zeros(2)}, str(path), metadata=meta)
    with pytest.raises(CorruptFileError, match=r"corrupt state cartridge: unexpected tensor 'weights'"):
        load_state(path, CFG)
    save_file({"layers.0.SSMState.conv": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(CorruptFileError, match=r"corrupt state cartridge: it holds layers \[0\], the model has "
                                               r"layers 0..1"):
        load_state(path, CFG)
    save_file({"layers.0.SSMState.conv": torch.zeros(1)}, str(path), metadata={"format": "hiss-state-v1"})
    with pytest.raises(CorruptFileError, match=r"its metadata has no model config"):
        load_state(path, CFG)


@pytest.mark.parametrize("text, says", [
    (b"\xff\xfe{}", r"config.json: not a text file \(byte 0 is not UTF-8\)"),
    (b"[1, 2]", r"config.json: expected a JSON object of config fields, got a JSON list"),
    (b'{"d_model": 16, "n_layer": 2, "ssm_cfg": {"d_state": 8', r"config.json: invalid JSON at line 1"),
    (b'{"d_model": "wide"}', r"config.json: MambaConfig: d_model must be a positive int, got 'wide'"),
    (b'{"model_type": "mamba"}', r"config.json: missing field 'hidden_size'"),
], ids=["not-utf8", "json-list", "json-truncated", "bad-field", "hf-missing-field"])
def test_damaged_config_names_the_file(ckpt, text, says):
    (ckpt / "config.json").write_bytes(text)
    with pytest.raises(ValueError, match=says):
        MambaLMHeadModel.from_pretrained(ckpt)


def test_weights_for_another_config_name_the_tensor_and_shapes(ckpt):
    (ckpt / "config.json").write_text(MambaConfig(d_model=32, n_layer=2, vocab_size=10).to_json())
    with pytest.raises(ValueError, match=r"the weights do not match config.json: backbone.embedding.weight has "
                                         r"shape \(16, 16\), the config expects \(16, 32\)"):
        MambaLMHeadModel.from_pretrained(ckpt)


def test_pytorch_bin_truncated_or_with_code(model, ckpt, tmp_path):
    (ckpt / "model.safetensors").unlink()
    binary = ckpt / "pytorch_model.bin"
    torch.save(model.state_dict(), binary)
    truncate_half(binary)
    pattern = rf"^{re.escape(str(binary))}: cannot read this PyTorch checkpoint .*corrupt or truncated"
    with pytest.raises(CorruptFileError, match=pattern):
        MambaLMHeadModel.from_pretrained(ckpt)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, binary)
    with pytest.raises(ValueError, match=rf"^{binary}: refused to load: .*never runs pickled code"):
        MambaLMHeadModel.from_pretrained(ckpt)
    assert not marker.exists()


def test_bad_shard_index_names_the_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CorruptFileError, match=r"model.safetensors.index.json: not a valid shard index"):
        MambaLMHeadModel.from_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"a": "part-1.safetensors"}}')
    with pytest.raises(FileNotFoundError, match=r"part-1.safetensors: no such file"):
        MambaLMHeadModel.from_pretrained(ckpt)


# ---- saves that fail or are killed midway ------------------------------------------------------------


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def bigger_model() -> MambaLMHeadModel:
    torch.manual_seed(1)
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=3, vocab_size=10, ssm_cfg={"d_state": 8}))


def half_then(after):
    """A stand-in for safetensors' save_file that writes half a file, then calls ``after``."""
    real = save_file

    def write(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        truncate_half(Path(filename))
        after()

    return write


def test_failed_save_pretrained_leaves_the_old_checkpoint(model, ckpt, monkeypatch):
    import safetensors.torch

    before = snapshot(ckpt)

    def fail():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then(fail))
    with pytest.raises(OSError, match="No space left"):
        bigger_model().save_pretrained(ckpt)
    assert snapshot(ckpt) == before  # same files, same bytes, no temp files left
    monkeypatch.undo()
    loaded = MambaLMHeadModel.from_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_config_write_failing_after_the_weights_leaves_the_old_pair(model, ckpt, monkeypatch):
    before = snapshot(ckpt)
    real = Path.write_text

    def failing_write_text(self, *a, **k):
        if ".config.json." in self.name:
            raise OSError(5, "Input/output error")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing_write_text)
    with pytest.raises(OSError, match="Input/output error"):
        bigger_model().save_pretrained(ckpt)
    assert snapshot(ckpt) == before


def test_failed_save_state_leaves_the_old_cartridge(model, cartridge, monkeypatch):
    import safetensors.torch

    before = snapshot(cartridge.parent)
    old = load_state(cartridge, CFG)

    def fail():
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then(fail))
    with torch.no_grad():
        new = model(torch.full((1, 50), 3, dtype=torch.long), return_state=True).state
    with pytest.raises(KeyboardInterrupt):
        save_state(cartridge, new, CFG)
    monkeypatch.undo()
    assert snapshot(cartridge.parent) == before
    again = load_state(cartridge, CFG)
    assert again.seqlen_offset == old.seqlen_offset == 4
    assert all(torch.equal(a, b) for a, b in zip(again.tensors().values(), old.tensors().values()))


KILLED_SAVE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch, safetensors.torch
    from ssm_core import MambaConfig, MambaLMHeadModel, save_state

    real = safetensors.torch.save_file

    def slow_save(tensors, filename, metadata=None):  # half the file on disk, then killed while writing the rest
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        print("writing", flush=True)
        time.sleep(600)

    safetensors.torch.save_file = slow_save
    torch.manual_seed(1)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=3, vocab_size=10, ssm_cfg={"d_state": 8}))
    if sys.argv[1] == "checkpoint":
        model.save_pretrained(sys.argv[2])
    else:
        state = MambaLMHeadModel(MambaConfig.from_json(sys.argv[3]))(torch.ones(1, 9, dtype=torch.long),
                                                                     return_state=True).state
        save_state(sys.argv[2], state, MambaConfig.from_json(sys.argv[3]))
""")


@pytest.mark.parametrize("what", ["checkpoint", "cartridge"])
def test_save_killed_midway_leaves_the_old_files(what, ckpt, cartridge):
    target = ckpt if what == "checkpoint" else cartridge
    folder = ckpt if what == "checkpoint" else cartridge.parent
    before = snapshot(folder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, what, str(target), CFG.to_json()], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while proc.stdout.readline().strip() != "writing":
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() - t0 < 120
        temps = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
        assert temps, "the save should be writing a temp file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if not k.endswith(".tmp")} == before  # a killed save leaves its temp
    if what == "checkpoint":
        MambaLMHeadModel.from_pretrained(ckpt)
    else:
        assert load_state(cartridge, CFG).seqlen_offset == 4
    # the next save to the same target removes the dead writer's temp file (once it is a minute old)
    left = [p for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1
    os.utime(left[0], (time.time() - 120, time.time() - 120))
    model = bigger_model()
    if what == "checkpoint":
        model.save_pretrained(ckpt)
    else:
        with torch.no_grad():
            save_state(cartridge, model(torch.ones(1, 9, dtype=torch.long), return_state=True).state, model.config)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_removes_only_dead_writers_stale_temp_files(tmp_path):
    """A killed atomic_write leaves .NAME.PID.HEX.tmp; the next write to NAME removes those of dead processes
    that have not changed for a minute, never a live process's, a fresh one or another target's."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited (and is very unlikely reused yet)
    live = str(os.getppid())
    def temp(name: str, pid: str, age_s: float | None = None) -> Path:
        p = tmp_path / f".{name}.{pid}.{uuid.uuid4().hex}.tmp"
        p.write_bytes(b"half a file")
        if age_s is not None:
            os.utime(p, (time.time() - age_s, time.time() - age_s))
        return p

    stale = temp("w.bin", dead, 3600)
    keep = [temp("w.bin", live, 3600),         # its writer is alive
            temp("w.bin", dead),               # fresh: a writer on another machine may still be writing
            temp("other.bin", dead, 3600),     # another target's
            temp("w.bin.x", dead, 3600)]       # a name that only starts like ours
    (tmp_path / "w.bin.notes.tmp").write_text("not a temp file of atomic_write")
    atomic_write(tmp_path / "w.bin", lambda p: Path(p).write_bytes(b"new"))
    assert (tmp_path / "w.bin").read_bytes() == b"new"
    assert not stale.exists()
    assert all(p.exists() for p in keep) and (tmp_path / "w.bin.notes.tmp").exists()
    assert remove_stale_temp_files(tmp_path / "w.bin", min_age_s=0) == [keep[1]]
