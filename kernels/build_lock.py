"""A build lock for the JIT-built kernels that a killed builder cannot leave behind.

``torch.utils.cpp_extension.load`` serialises builds with a ``FileBaton``: the file ``lock`` in the build
folder, created with O_EXCL and removed when the build ends. A builder killed by SIGTERM or ``kill -9``
never removes it, and every later process then waits for it forever, without a word.

``build_lock(folder)`` wraps the build in a lock the kernel releases when its owner dies: ``flock`` on
``folder/hiss-build.lock`` (the owner's pid is written inside, for messages). Holding it means no
process following this protocol is building in ``folder``, so a ``lock`` file found there is stale: it is
removed (one line on stderr says so) and torch then builds normally. Compilers that the killed build left
running (they outlive their parent, with the build folder as their working directory; found through
/proc on Linux) are waited for first, so two builds never write the same objects.

While another live process builds, one line is printed ("waiting for another process building ... in DIR
(pid N)") and the wait ends after ``timeout`` seconds (``$HISS_KERNEL_BUILD_TIMEOUT``, default 900) with a
``TimeoutError`` that says which process to check and what to delete.

On a platform without ``fcntl`` (Windows) this is a no-op and torch's own lock applies.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["build_lock", "LOCK_NAME", "TORCH_LOCK_NAME", "DEFAULT_TIMEOUT_S", "default_timeout"]

LOCK_NAME = "hiss-build.lock"
TORCH_LOCK_NAME = "lock"  # torch.utils.file_baton.FileBaton's file in the build directory
DEFAULT_TIMEOUT_S = 900.0


def default_timeout() -> float:
    """``$HISS_KERNEL_BUILD_TIMEOUT`` seconds, else DEFAULT_TIMEOUT_S."""
    raw = os.environ.get("HISS_KERNEL_BUILD_TIMEOUT", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"HISS_KERNEL_BUILD_TIMEOUT must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"HISS_KERNEL_BUILD_TIMEOUT must be positive, got {raw!r}")
    return value


def _say(msg: str) -> None:
    print(f"hiss: {msg}", file=sys.stderr, flush=True)


def _owner(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def _compilers_in(folder: Path) -> list[int]:
    """Pids (other than ours) whose working directory is ``folder``: what a killed build left running."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    target, me, found = os.path.realpath(folder), os.getpid(), []
    for e in entries:
        if e.isdigit() and int(e) != me:
            try:
                if os.readlink(f"/proc/{e}/cwd") == target and _is_build_tool(e):
                    found.append(int(e))
            except OSError:
                continue
    return found


_TOOLS = {"ninja", "cc1", "cc1plus", "as", "ld", "collect2", "lto1", "lto-wrapper", "cc", "c++"}


def _is_build_tool(pid: str) -> bool:
    """ninja, a compiler driver, compiler, assembler or linker (not, say, a shell that cd'd into the folder)."""
    with open(f"/proc/{pid}/comm") as f:
        name = f.read().strip()
    return name in _TOOLS or any(t in name for t in ("gcc", "g++", "clang", "ld."))


def _timeout_error(folder: Path, timeout: float, what: str, why: str) -> TimeoutError:
    return TimeoutError(
        f"gave up after {timeout:g} s waiting for {why} to finish building {what} in {folder}; "
        f"if that process is stuck, stop it, delete {folder} and run again "
        "(HISS_KERNEL_BUILD_TIMEOUT sets how long to wait)"
    )


@contextmanager
def build_lock(folder: str | os.PathLike, what: str = "the hiss CPU kernels", timeout: float | None = None,
               poll_s: float = 0.2) -> Iterator[None]:
    """Hold the build lock of ``folder`` (created if missing) for the body of the ``with``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    timeout = default_timeout() if timeout is None else float(timeout)
    deadline = time.monotonic() + timeout
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _owner(fd)
                if not said:
                    _say(f"waiting for another process building {what} in {folder} (pid {pid})")
                    said = True
                if time.monotonic() >= deadline:
                    raise _timeout_error(folder, timeout, what, f"pid {pid}") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = folder / TORCH_LOCK_NAME
        if stale.exists():
            said = False
            while pids := _compilers_in(folder):
                if not said:
                    _say(f"waiting for the compiler left running by a killed build of {what} in {folder} "
                         f"(pid {pids[0]})")
                    said = True
                if time.monotonic() >= deadline:
                    raise _timeout_error(folder, timeout, what, f"the left-over compiler (pid {pids[0]})")
                time.sleep(poll_s)
            try:
                os.remove(stale)
                _say(f"removed a stale build lock left by a killed build: {stale}")
            except FileNotFoundError:
                pass
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
