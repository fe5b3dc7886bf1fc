"""apps.common.errors.run_cli: a user's mistake is one line on stderr and exit status 2; a programming error
keeps its traceback (status 1); --debug / HISS_DEBUG=1 show the traceback of either.

The command-line behaviour runs a tiny script in a subprocess; the catalogue of exception kinds runs in
process (same code path, no interpreter start per case).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
ERRORS_PY = REPO / "apps" / "common" / "errors.py"

# errors.py has no dependencies: load it by path, so neither the script nor these tests pay for importing
# the whole app kit (Lightning) just to test it
_spec = importlib.util.spec_from_file_location("hiss_cli_errors", ERRORS_PY)
errors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(errors)

SCRIPT = textwrap.dedent(f"""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("errors", {str(ERRORS_PY)!r})
    errors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(errors)

    def main(argv=None):
        argv = sys.argv[1:] if argv is None else argv
        if argv[0] == "user":
            raise ValueError("genome.fa, line 3, column 7: expected one of ACGTN, got 'Z'")
        if argv[0] == "bug":
            return None.upper()  # AttributeError
        if argv[0] == "missing":
            open("/nonexistent/hiss/genome.fa")
        print("ran with", argv)

    errors.run_cli(main)
""")


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "HISS_DEBUG"}
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], env={**full, **env}, capture_output=True,
                          text=True, timeout=60)


def test_user_error_is_one_line_and_status_2():
    r = cli("user")
    assert r.returncode == 2
    assert r.stderr == "error: genome.fa, line 3, column 7: expected one of ACGTN, got 'Z'\n"
    assert r.stdout == ""


def test_missing_file_names_the_file():
    r = cli("missing")
    assert (r.returncode, r.stderr) == (2, "error: /nonexistent/hiss/genome.fa: No such file or directory\n")


def test_programming_error_keeps_its_traceback():
    r = cli("bug")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "AttributeError: 'NoneType' object has no attribute 'upper'" in r.stderr
    assert "error: " not in r.stderr.splitlines()[-1][:7]


@pytest.mark.parametrize("how", ["--debug", "HISS_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_user_error(how):
    r = cli("user", "--debug") if how == "--debug" else cli("user", HISS_DEBUG="1")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.rstrip().endswith("ValueError: genome.fa, line 3, column 7: expected one of ACGTN, got 'Z'")


def test_debug_flag_is_removed_before_main_reads_the_arguments():
    r = cli("ok", "--debug", "x")
    assert (r.returncode, r.stdout) == (0, "ran with ['ok', 'x']\n")
    assert cli("ok", HISS_DEBUG="0").returncode == 0


def _payload():
    class Payload:
        pass
    return Payload()


def _unpack():
    a, b = [1, 2, 3]
    return a, b


# what main raises -> the line shown (None: a programming error, re-raised with its traceback)
USER = "error: "
CATALOGUE = {
    "UserError": (lambda: (_ for _ in ()).throw(errors.UserError("--n must be at least 1, got -5")),
                  "--n must be at least 1, got -5"),
    "ValueError": (lambda: int("abc"), "invalid literal for int() with base 10: 'abc'"),
    "JSONDecodeError": (lambda: json.loads('{"a": '), "Expecting value: line 1 column 7 (char 6)"),
    "UnicodeDecodeError": (lambda: b"\xff".decode(), "'utf-8' codec can't decode byte 0xff in position 0: "
                                                      "invalid start byte"),
    "FileNotFoundError-with-our-message": (
        lambda: (_ for _ in ()).throw(FileNotFoundError("runs/x: no checkpoint (train one first)")),
        "runs/x: no checkpoint (train one first)"),
    "IsADirectoryError": (lambda: open(REPO), f"{REPO}: Is a directory"),
    "OSError-disk-full": (lambda: (_ for _ in ()).throw(OSError(28, "No space left on device", "out.pt")),
                          "out.pt: No space left on device"),
    "KeyError-sentence": (lambda: (_ for _ in ()).throw(KeyError("no record 'chr9' in genome.fa")),
                          "no record 'chr9' in genome.fa"),
    "MemoryError": (lambda: (_ for _ in ()).throw(MemoryError()), "out of memory (try a smaller input, batch or "
                                                                   "model)"),
    "KeyError-bare": (lambda: {}["chr9"], None),
    "unpacking-ValueError": (_unpack, None),
    "TypeError": (lambda: len(5), None),
    "AttributeError": (lambda: _payload().missing, None),
    "AssertionError": (lambda: (_ for _ in ()).throw(AssertionError("invariant")), None),
    "IndexError": (lambda: [][0], None),
    "RuntimeError": (lambda: (_ for _ in ()).throw(RuntimeError("shape '[2, 3]' is invalid")), None),
    "NotImplementedError": (lambda: (_ for _ in ()).throw(NotImplementedError()), None),
}


@pytest.mark.parametrize("raise_it, line", CATALOGUE.values(), ids=list(CATALOGUE))
def test_which_errors_are_the_users(raise_it, line, capsys, monkeypatch):
    monkeypatch.delenv("HISS_DEBUG", raising=False)

    def main(argv):
        raise_it()

    if line is None:
        with pytest.raises(Exception) as info:
            errors.run_cli(main, [])
        assert not isinstance(info.value, SystemExit)
        assert capsys.readouterr().err == ""
    else:
        with pytest.raises(SystemExit) as info:
            errors.run_cli(main, [])
        assert info.value.code == 2
        assert capsys.readouterr().err == f"error: {line}\n"


def test_corrupt_checkpoint_from_ssm_core_is_one_line(tmp_path, capsys):
    from ssm_core import read_safetensors

    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00" * 3)
    with pytest.raises(SystemExit) as info:
        errors.run_cli(lambda argv: read_safetensors(bad, kind="checkpoint"), [])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {bad}: cannot read this checkpoint (3 bytes): it is corrupt or truncated")


def test_ctrl_c_is_one_word_and_130(capsys, monkeypatch):
    monkeypatch.delenv("HISS_DEBUG", raising=False)

    def main(argv):
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        errors.run_cli(main, [])
    assert info.value.code == 130 and capsys.readouterr().err == "interrupted\n"
    with pytest.raises(KeyboardInterrupt):
        errors.run_cli(main, ["--debug"])


def test_argparse_exit_passes_through(capsys):
    import argparse

    def main(argv):
        argparse.ArgumentParser(prog="tool").parse_args(argv)

    with pytest.raises(SystemExit) as info:
        errors.run_cli(main, ["--nope"])
    assert info.value.code == 2 and "tool: error: unrecognized arguments: --nope" in capsys.readouterr().err


def test_sys_argv_is_restored(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "a", "--debug", "b"])
    seen = []
    errors.run_cli(lambda: seen.append(list(sys.argv)))
    assert seen == [["prog", "a", "b"]] and sys.argv == ["prog", "a", "--debug", "b"]



def test_every_app_entry_point_runs_through_run_cli():
    """docs/errors.md promises one line per user error (and --debug) for every `python -m apps.*` command: each
    module's __main__ block, and each package's __main__.py, hands its main to run_cli."""
    missing = []
    for path in sorted((REPO / "apps").rglob("*.py")):
        text = path.read_text()
        guard = 'if __name__ == "__main__":'
        body = text.split(guard, 1)[1] if guard in text else (text if path.name == "__main__.py" else None)
        if body is not None and "run_cli(" not in body:
            missing.append(str(path.relative_to(REPO)))
    assert not missing, missing
