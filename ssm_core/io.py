"""File helpers: crash-safe writes shared by checkpoints, state cartridges, apps and experiments."""

from __future__ import annotations

import errno
import json
import os
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path

STALE_TEMP_AGE_S = 60.0  # a dead writer's temp file is removed once it has not changed for this long


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only the existence check
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # not a PID this system could have
        return False
    return True


def remove_stale_temp_files(path: str | os.PathLike, min_age_s: float = STALE_TEMP_AGE_S) -> list[Path]:
    """Delete the temp files an ``atomic_write`` to ``path`` left behind when its process was killed (``kill -9``,
    a power cut): ``.NAME.PID.HEX.tmp`` beside ``path`` whose PID is no longer running here and which have not
    changed for ``min_age_s`` seconds (a writer on another machine sharing the folder, whose PID means nothing
    here, is still writing to its file). A live process's temp file is never touched. Returns what was removed.
    """
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{32}}\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < min_age_s:
                continue
            os.remove(entry.path)
        except OSError:  # gone already (another process cleaning up), or not ours to remove
            continue
        removed.append(Path(entry.path))
    return removed


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write through a temp file in the same directory, then rename: a failed write leaves the old
    file intact. The temp file is created by ``write`` itself (not mkstemp, whose 0600 mode would
    survive the rename), so the result gets the usual umask permissions. It is named
    ``.NAME.PID.HEX.tmp``; a failed write removes it, a killed one cannot, so each write first removes
    the temp files of earlier writes to the same target whose process is dead (``remove_stale_temp_files``).
    A missing folder is a FileNotFoundError naming it (nothing is created)."""
    path = Path(path)
    if not path.parent.is_dir():  # say so about the target's folder, not about a temp file the user never named
        raise FileNotFoundError(errno.ENOENT, f"no such folder to write {path.name} in", str(path.parent))
    remove_stale_temp_files(path)
    tmp = str(path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class CorruptFileError(ValueError):
    """A file that is there but cannot be read as what it should be: truncated, corrupt or another format.
    A ValueError, so callers (and the command lines) treat it as bad input, with a message naming the file."""


def _unreadable(path: Path, kind: str, reason: str) -> CorruptFileError:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        hint = "it is a zip archive (a torch.save file?), not safetensors"
    elif size == 0:
        hint = "the file is empty"
    else:
        hint = "it is corrupt or truncated (an interrupted download, copy or save?)"
    return CorruptFileError(f"{path}: cannot read this {kind} ({size:,} bytes): {hint} [{reason}]; "
                            "replace it with a good copy")


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a file")
    return path


def read_safetensors_metadata(path: str | os.PathLike, kind: str = "safetensors file") -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} if none), reading only its header.
    Errors as ``read_safetensors``."""
    from safetensors import SafetensorError, safe_open

    path = _checked_path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise _unreadable(path, kind, str(e)) from e


def read_safetensors(path: str | os.PathLike, device="cpu", kind: str = "safetensors file") -> dict:
    """Every tensor of a safetensors file, {name: tensor} on ``device``.

    A missing path is a FileNotFoundError and a directory an IsADirectoryError, each naming the path; a file
    that is not readable safetensors (truncated, corrupt, empty, another format) is a ``CorruptFileError``
    (a ValueError) that names the file, its size and what is wrong. ``kind`` names the file in messages
    ("checkpoint", "state cartridge").
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _checked_path(path)
    try:
        return load_file(str(path), device=device if isinstance(device, str) else str(device))
    except SafetensorError as e:
        raise _unreadable(path, kind, str(e)) from e


def read_json_object(path: str | os.PathLike, missing_hint: str = "") -> dict:
    """A config file that must hold a JSON object; every failure names the file (and line/column for bad JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file{' (' + missing_hint + ')' if missing_hint else ''}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path}: not a text file (byte {e.start} is not UTF-8): corrupt?") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object of config fields, got a JSON {type(raw).__name__}")
    return raw
