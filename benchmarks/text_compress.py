"""Bits per byte of a hiss byte model beside classical compressors, on the same held-out files.

    python -m benchmarks.text_compress                      # shipped model: held-out files + unseen prose
    python -m benchmarks.text_compress --ckpt runs/text_pretrain/pretrained --draft DIR --no-docs
    python -m benchmarks.text_compress --group "my corpus=data/mine/" --no-docs

Groups of files (default: the held-out test files of each corpus of ``apps/text/configs/pretrain.yaml``, split
exactly as training split them, plus English prose no corpus contains: the licence texts every Debian/Ubuntu
machine has in /usr/share/common-licenses). Every coder is charged for every byte:

* compressors (benchmarks._compressors: gzip -9, bzip2 -9, xz -9e, zstd --ultra -22) run two ways: on each file
  alone (sizes summed; what compressing those files one by one costs, headers included) and on the group's files
  concatenated (one stream: the compressor also learns across files; the stronger baseline).
  bits/byte = 8 x output bytes / input bytes.
* hiss: the model's exact log-likelihood of each whole file (apps.text.evaluate: state carried across pieces),
  the first byte of a file charged 8 bits (the model predicts every byte from the ones before it). A true code
  length: an arithmetic coder driven by the model reaches it within a few bits per file. Parameters not counted
  (the ML convention; the shipped model is 10.8 MB).

The table goes into the ``text_compress`` block of docs/text.md.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from benchmarks._compressors import COMPRESSORS, compressed_sizes
from benchmarks._doc import publish

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "text.md"
CONFIG = ROOT / "apps" / "text" / "configs" / "pretrain.yaml"
DEFAULT_CKPT = ROOT / "apps" / "text" / "assets" / "byte_mamba"
DEFAULT_DRAFT = ROOT / "apps" / "text" / "assets" / "byte_mamba_draft"
LICENCES = Path("/usr/share/common-licenses")
PROSE = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "LGPL-2.1")


@dataclass
class Group:
    name: str
    files: list[str]
    bytes: int = 0
    per_file: dict[str, float] = field(default_factory=dict)  # compressor -> bits/byte, files compressed one by one
    joined: dict[str, float] = field(default_factory=dict)  # compressor -> bits/byte, files concatenated
    model: dict[str, float] = field(default_factory=dict)  # "hiss" / "draft" -> bits/byte
    model_files: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> file -> bits/byte
    seconds: dict[str, float] = field(default_factory=dict)

    def best_classical(self) -> float:
        return min(v for v in [*self.per_file.values(), *self.joined.values()] if not math.isnan(v))


def heldout_groups(config: Path = CONFIG) -> list[Group]:
    """The test files of each corpus folder of a text training config, split as its data module splits them."""
    from apps.text.data import list_files, split_files

    data = yaml.safe_load(config.read_text())["data"]
    roots = [ROOT / p for p in data["paths"]]
    missing = [str(r) for r in roots if not r.is_dir()]
    if missing:
        raise SystemExit(f"{', '.join(missing)}: missing; fetch the corpora first (see the header of {config})")
    _, _, test = split_files(list_files(roots, data.get("pattern", "*")), data["valid_fraction"],
                             data["test_fraction"], roots=roots)
    return [Group(f"{r.name} (held-out files)", [str(f) for f in test if f.is_relative_to(r)]) for r in roots]


def prose_group() -> list[Group]:
    files = [str(LICENCES / n) for n in PROSE if (LICENCES / n).is_file()]
    return [Group("unseen English prose (licence texts)", files)] if files else []


def measure(g: Group, models: dict) -> Group:
    """models: name -> checkpoint path or loaded model (main loads each once for all groups)."""
    from apps.text.evaluate import evaluate_files

    blobs = [Path(f).read_bytes() for f in g.files]
    g.bytes = sum(map(len, blobs))
    t = time.perf_counter()
    sizes = [compressed_sizes(b) for b in blobs]
    joined = compressed_sizes(b"".join(blobs))
    for c in COMPRESSORS:
        g.per_file[c] = math.nan if joined[c] is None else 8 * sum(s[c] for s in sizes) / g.bytes
        g.joined[c] = math.nan if joined[c] is None else 8 * joined[c] / g.bytes
    g.seconds["compressors"] = time.perf_counter() - t
    for name, ckpt in models.items():
        t = time.perf_counter()
        r = evaluate_files(ckpt, g.files)
        # evaluate_files scores bytes 2..n of each file (the first is context): the bytes it did not score (first
        # bytes, one-byte files) are charged 8 bits each
        bits = r["total"] * r["bytes"] + 8 * (g.bytes - r["bytes"])
        g.model[name] = bits / g.bytes
        g.model_files[name] = r["files"]
        g.seconds[name] = time.perf_counter() - t
    return g


def render(groups: list[Group], models: dict[str, str], threads: int) -> str:
    shown = {k: os.path.relpath(v, ROOT) if Path(v).is_absolute() else v for k, v in models.items()}
    cols = " | ".join(COMPRESSORS)
    out = [f"**Bits per byte beside classical compressors**, measured {datetime.date.today()} "
           f"(`python -m benchmarks.text_compress`, {threads} torch thread(s)). Compressors: per-file / "
           "concatenated (each file alone, sizes summed / the group's files as one stream). "
           + "; ".join(f"{k}: `{v}`" for k, v in shown.items())
           + ", exact log-likelihood of each whole file, first byte at 8 bits. Bold: the lowest in the row.", "",
           f"| files | n | bytes | {cols} | " + " | ".join(models) + " |",
           "| --- | ---: | ---: | " + " | ".join("---:" for _ in [*COMPRESSORS, *models]) + " |"]
    for g in groups:
        best = min([g.best_classical(), *g.model.values()])
        def bold(x: float, best: float = best) -> str:
            return f"**{x:.3f}**" if abs(x - best) < 5e-4 else f"{x:.3f}"

        comp = " | ".join("not installed" if math.isnan(g.joined[c]) else
                          f"{bold(g.per_file[c])} / {bold(g.joined[c])}" for c in COMPRESSORS)
        mods = " | ".join(bold(g.model[m]) for m in models)
        out.append(f"| {g.name} | {len(g.files)} | {g.bytes:,} | {comp} | {mods} |")
    verdicts = [f"{g.name}: {'yes' if g.model['hiss'] < g.best_classical() else 'no'} (hiss {g.model['hiss']:.3f}, "
                f"best compressor {g.best_classical():.3f})" for g in groups if "hiss" in g.model]
    out += ["", "hiss below every compressor? " + "; ".join(verdicts) + "."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[Group]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT), help="byte model (save_pretrained dir, mamba_ssm, .ckpt)")
    p.add_argument("--draft", default=None, help="a second (draft) model scored beside it")
    p.add_argument("--group", action="append", metavar="NAME=PATH[,PATH...]",
                   help="score these files/folders as one group instead of the defaults (repeatable)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=str(DOC), help="markdown file whose text_compress block is replaced")
    p.add_argument("--no-docs", action="store_true", help="print only")
    p.add_argument("--json", help="also write the groups (per-file figures included) here")
    args = p.parse_args(argv)
    import torch

    from apps.text.data import list_files

    torch.set_num_threads(args.threads)
    if args.group:
        groups = []
        for spec in args.group:
            name, sep, paths = spec.partition("=")
            if not sep or not paths:
                p.error(f"--group {spec!r}: expected NAME=PATH[,PATH...]")
            groups.append(Group(name, [str(f) for f in list_files(paths.split(","))]))
    else:
        groups = heldout_groups() + prose_group()
    from apps.text.generate import default_model, load_model

    models = {"hiss": args.ckpt} | ({"draft": args.draft} if args.draft else {})
    loaded = {name: load_model(default_model(ckpt)) for name, ckpt in models.items()}  # once, not per group
    for g in groups:
        measure(g, loaded)
        print(f"{g.name}: {len(g.files)} files, {g.bytes:,} bytes  "
              + "  ".join(f"{c} {g.per_file[c]:.3f}/{g.joined[c]:.3f}" for c in COMPRESSORS)
              + "  " + "  ".join(f"{m} {v:.3f}" for m, v in g.model.items()), flush=True)
    block = render(groups, models, torch.get_num_threads())
    publish(block, "text_compress", args.doc, groups, args.json, not args.no_docs)
    return groups


if __name__ == "__main__":
    main()
