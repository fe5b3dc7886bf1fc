"""The classical compressors the model benchmarks are compared with: the libraries behind the command-line
tools at the same settings (gzip, bz2, lzma from Python), zstd through its binary when installed."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess

COMPRESSORS = ("gzip -9", "bzip2 -9", "xz -9e", "zstd --ultra -22")


def _zstd(data: bytes) -> int | None:
    exe = shutil.which("zstd")
    if exe is None:
        return None
    out = subprocess.run([exe, "--ultra", "-22", "-c", "-q"], input=data, capture_output=True, check=True)
    return len(out.stdout)


def compressed_sizes(data: bytes) -> dict[str, int | None]:
    """Bytes each compressor writes for ``data`` (None: not installed here)."""
    return {
        "gzip -9": len(gzip.compress(data, compresslevel=9, mtime=0)),
        "bzip2 -9": len(bz2.compress(data, compresslevel=9)),
        "xz -9e": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
        "zstd --ultra -22": _zstd(data),
    }
