"""File helpers: crash-safe writes shared by checkpoints, state cartridges, apps and experiments."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Write through a temp file in the same directory, then rename: a failed write leaves the old
    file intact. The temp file is created by ``write`` itself (not mkstemp, whose 0600 mode would
    survive the rename), so the result gets the usual umask permissions."""
    path = Path(path)
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
