"""Fault tests for the kernel build lock (kernels/build_lock.py): a builder killed by SIGKILL or SIGTERM
mid-build leaves torch's FileBaton ``lock`` behind; the next process must not wait forever.

The quick tests run ``kernels.cpu.load()`` in subprocesses with a temporary ``$HISS_KERNEL_CACHE`` and
``torch.utils.cpp_extension.load`` replaced by a stand-in that takes torch's real ``FileBaton`` exactly as
``cpp_extension._jit_compile`` does, then "compiles" by sleeping. The ``slow`` test kills a real build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A process that builds the kernels through kernels.cpu.load() with a fake compiler step.
# BUILD_SECONDS: how long the fake compile takes (it prints "compiling" when it starts).
FAKE_BUILD = textwrap.dedent("""
    import os, sys, time, types
    from pathlib import Path
    from torch.utils import cpp_extension
    from torch.utils.file_baton import FileBaton

    def fake_load(name, sources, build_directory, **kwargs):  # the baton logic of cpp_extension._jit_compile
        baton = FileBaton(os.path.join(build_directory, "lock"))
        if baton.try_acquire():
            try:
                print("compiling", flush=True)
                until = os.environ.get("BUILD_UNTIL")  # a file whose appearance ends the build
                t0 = time.time()
                while time.time() - t0 < float(os.environ["BUILD_SECONDS"]) and not (until and os.path.exists(until)):
                    time.sleep(0.05)
                Path(build_directory, "built").write_text(str(os.getpid()))
            finally:
                baton.release()
        else:
            baton.wait()
        return types.SimpleNamespace()

    cpp_extension.load = fake_load
    cpp_extension.is_ninja_available = lambda: True
    import kernels.cpu as kcpu
    print("available" if kcpu.available() else "unavailable: " + kcpu.unavailable_reason(), flush=True)
    print(kcpu.build_dir(), flush=True)
""")


def start(cache: Path, build_seconds: float, **env) -> subprocess.Popen:
    full = {**os.environ, "HISS_KERNEL_CACHE": str(cache), "BUILD_SECONDS": str(build_seconds),
            "CXX": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    full.pop("HISS_DISABLE_KERNELS", None)
    return subprocess.Popen([sys.executable, "-c", FAKE_BUILD], cwd=REPO, env=full, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_line(proc: subprocess.Popen, want: str, timeout: float = 120) -> None:
    """Read proc's stdout until a line equals ``want`` (importing torch can take a while on a loaded box)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {want!r}: {proc.stderr.read()}")
    raise AssertionError(f"no {want!r} within {timeout} s")


def finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"still waiting after {timeout} s; stderr: {err}") from None
    return out, err


def build_folder(cache: Path) -> Path:
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_build_killed_midway_does_not_block_the_next_process(tmp_path, sig):
    first = start(tmp_path, build_seconds=600)
    try:
        wait_for_line(first, "compiling")
        first.send_signal(sig)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    folder = build_folder(tmp_path)
    assert (folder / "lock").exists(), "the killed build should have left torch's lock behind"

    out, err = finish(start(tmp_path, build_seconds=0), timeout=120)
    assert out.splitlines()[-2] == "available", err
    assert f"removed a stale build lock left by a killed build: {folder / 'lock'}" in err
    assert (folder / "built").is_file() and not (folder / "lock").exists()


def test_a_live_build_makes_the_next_process_wait_with_one_line_then_it_loads(tmp_path):
    # the first build lasts until the second process has said it waits: no race with a slow torch import
    release = tmp_path / "release"
    first = start(tmp_path / "cache", build_seconds=300, BUILD_UNTIL=str(release))
    second = None
    try:
        wait_for_line(first, "compiling")
        second = start(tmp_path / "cache", build_seconds=0)
        lines, t0 = [], time.time()
        while time.time() - t0 < 120 and not any("waiting for" in line for line in lines):
            line = second.stderr.readline()
            if not line and second.poll() is not None:
                break
            lines.append(line)
        release.touch()
        out, err = finish(second, timeout=120)
        err = "".join(lines) + err
        finish(first, timeout=60)
    finally:
        release.touch()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
    folder = build_folder(tmp_path / "cache")
    waiting = [line for line in err.splitlines() if "waiting for" in line]
    assert waiting == [f"hiss: waiting for another process building the hiss CPU kernels in {folder} "
                       f"(pid {first.pid})"]
    assert out.splitlines()[-2] == "available" and "stale" not in err


def test_a_stuck_build_times_out_naming_the_pid_and_what_to_delete(tmp_path):
    first = start(tmp_path, build_seconds=600)
    try:
        wait_for_line(first, "compiling")
        t0 = time.time()
        out, err = finish(start(tmp_path, build_seconds=0, HISS_KERNEL_BUILD_TIMEOUT="1.5"), timeout=120)
        waited = time.time() - t0
    finally:
        first.kill()
        first.communicate()
    folder = build_folder(tmp_path)
    reason = out.splitlines()[-2]
    assert reason.startswith("unavailable: TimeoutError: gave up after 1.5 s waiting for pid "
                             f"{first.pid} to finish building the hiss CPU kernels in {folder}")
    assert f"delete {folder} and run again" in reason
    assert waited < 60


def test_compiler_left_running_by_a_killed_build_is_waited_for(tmp_path, capfd):
    if not Path("/proc/self/cwd").exists():
        pytest.skip("needs /proc (Linux)")
    from kernels.build_lock import build_lock

    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "lock").touch()  # what the killed parent left
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "cc1plus").symlink_to(sys.executable)  # a process named like the compiler, cwd = build folder
    orphan = subprocess.Popen([str(tools / "cc1plus"), "-c", "import time; time.sleep(2)"], cwd=folder)
    try:
        time.sleep(0.3)
        t0 = time.time()
        with build_lock(folder, timeout=60):
            assert orphan.poll() is not None, "entered the lock while the left-over compiler still ran"
            assert not (folder / "lock").exists()
        assert time.time() - t0 < 30
    finally:
        orphan.kill()
        orphan.wait()
    err = capfd.readouterr().err
    assert f"waiting for the compiler left running by a killed build of the hiss CPU kernels in {folder} " \
           f"(pid {orphan.pid})" in err


def test_build_timeout_setting_is_checked(monkeypatch):
    from kernels.build_lock import DEFAULT_TIMEOUT_S, default_timeout

    monkeypatch.delenv("HISS_KERNEL_BUILD_TIMEOUT", raising=False)
    assert default_timeout() == DEFAULT_TIMEOUT_S
    for bad in ("soon", "-1", "0"):
        monkeypatch.setenv("HISS_KERNEL_BUILD_TIMEOUT", bad)
        with pytest.raises(ValueError, match="HISS_KERNEL_BUILD_TIMEOUT must be"):
            default_timeout()


REAL_BUILD = textwrap.dedent("""
    import torch, kernels.cpu as kcpu
    ok = kcpu.available()
    print("available" if ok else "unavailable: " + kcpu.unavailable_reason(), flush=True)
    if ok:
        u, delta = torch.randn(1, 4, 32), torch.rand(1, 4, 32)
        A, B, C = -torch.rand(4, 8), torch.randn(1, 8, 32), torch.randn(1, 8, 32)
        from ssm_core.ops.selective_scan import selective_scan_ref
        ref = selective_scan_ref(u, delta, A, B, C)
        print("match" if torch.allclose(kcpu.selective_scan_cpu(u, delta, A, B, C), ref, atol=1e-4) else "MISMATCH")
""")


@pytest.mark.slow
def test_real_build_killed_midway_then_the_next_process_builds_working_kernels(tmp_path):
    """kill -9 a real first build while it compiles; a second process must build and load (~2-4 min)."""
    import shutil

    from torch.utils import cpp_extension

    if shutil.which(os.environ.get("CXX", "c++")) is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja here")
    env = {**os.environ, "HISS_KERNEL_CACHE": str(tmp_path), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("HISS_DISABLE_KERNELS", None)
    first = subprocess.Popen([sys.executable, "-c", REAL_BUILD], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        t0 = time.time()
        while not list(tmp_path.glob("*/lock")):  # torch took its lock: the build has started
            assert first.poll() is None and time.time() - t0 < 300, "the first build never started"
            time.sleep(0.2)
        time.sleep(5)  # mid-compile
        assert first.poll() is None, "the build finished before it could be killed"
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert list(tmp_path.glob("*/lock")), "the killed build should have left torch's lock behind"
    second = subprocess.run([sys.executable, "-c", REAL_BUILD], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.stdout.split() == ["available", "match"], second.stderr
    assert "removed a stale build lock" in second.stderr
