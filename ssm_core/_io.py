"""File helpers shared by checkpoints and state cartridges."""

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
