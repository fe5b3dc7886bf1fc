"""Exact bits/byte of a byte-level checkpoint on files:

    python -m apps.text.evaluate --ckpt runs/text/mamba/version_0/pretrained --files a.txt docs/ ...

Each file is one document read whole, in ``--chunk-len`` pieces with the state carried across
(apps.common.sequence_nll): exact for any length, memory of one piece. Folders are read recursively.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from .data import BOS, Doc, list_files
from .generate import load_model
from .model import corpus_bits_per_byte

__all__ = ["evaluate_files", "main"]


def evaluate_files(ckpt: str | Path, files: list[str | Path], pattern: str = "*", chunk_len: int = 8192,
                   max_bytes: int | None = None) -> dict:
    """{"files": {path: bits/byte}, "total": bits/byte over all scored bytes, "bytes": scored count}."""
    model = load_model(ckpt)
    specials = model.config.vocab_size > BOS  # a vocabulary with BOS/EOS: documents are framed by them
    paths = list_files(files, pattern)
    per_file, total_bits, total_n = {}, 0.0, 0
    for f in paths:
        if f.stat().st_size == 0 or (not specials and f.stat().st_size < 2):
            continue  # nothing to predict
        bpb, n = corpus_bits_per_byte(model, [Doc(f)], specials, chunk_len, max_bytes)
        per_file[str(f)] = bpb
        total_bits, total_n = total_bits + bpb * n, total_n + n
    if total_n == 0:
        raise ValueError(f"nothing to score in {[str(p) for p in paths]} (empty files)")
    return {"files": per_file, "total": total_bits / total_n, "bytes": total_n}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint directory (hiss save_pretrained, mamba_ssm, HF)")
    p.add_argument("--files", nargs="+", required=True, help="files and/or folders")
    p.add_argument("--pattern", default="*", help="file-name filter inside folders, e.g. '*.txt'")
    p.add_argument("--chunk-len", type=int, default=8192)
    p.add_argument("--max-bytes", type=int, help="score at most this many bytes per file")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    result = evaluate_files(a.ckpt, a.files, a.pattern, a.chunk_len, a.max_bytes)
    width = max(len(f) for f in result["files"])
    for f, bpb in result["files"].items():
        print(f"{f:<{width}}  {bpb:.4f} bits/byte")
    print(f"{'total':<{width}}  {result['total']:.4f} bits/byte over {result['bytes']:,} bytes "
          f"(perplexity per byte {math.pow(2, result['total']):.3f})")
    return result


if __name__ == "__main__":
    main()
