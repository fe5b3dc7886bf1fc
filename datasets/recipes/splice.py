"""Splice-junction sequences (UCI StatLog "DNA", 3,186 x 60 nt; classes EI, IE, N) -> one small TSV.

    python datasets/recipes/splice.py                      # apt-get download r-cran-mlbench, convert
    python datasets/recipes/splice.py --rda path/DNA.rda   # an already unpacked mlbench DNA.rda

Source: Debian ``r-cran-mlbench`` ships the StatLog version as ``mlbench/data/DNA.rda`` (object ``DNA``): 180
binary columns V1..V180, three per base (A=100, C=010, G=001, T=000), and ``Class`` (ei / ie / n). We decode
the bases back and write ``datasets/samples/splice_uci.tsv.gz`` with columns ``split label id sequence``:
a seeded shuffle split into 2,000 train / 186 validation / 1,000 test rows (StatLog's own split sizes, with a
validation slice taken out of its 1,186 test rows). Needs the PyPI package ``rdata``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "datasets" / "samples" / "splice_uci.tsv.gz"
RDA_IN_DEB = "usr/lib/R/site-library/mlbench/data/DNA.rda"
CODES = {(1, 0, 0): "A", (0, 1, 0): "C", (0, 0, 1): "G", (0, 0, 0): "T"}
LABELS = {"ei": "EI", "ie": "IE", "n": "N"}
SPLITS = (("train", 2000), ("val", 186), ("test", 1000))


def fetch_rda(workdir: Path) -> Path:
    """apt-get download the mlbench package (no install) and unpack it; returns the DNA.rda path."""
    subprocess.run(["apt-get", "download", "r-cran-mlbench"], cwd=workdir, check=True)
    deb = next(workdir.glob("r-cran-mlbench_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True)
    return workdir / "root" / RDA_IN_DEB


def decode_rows(rda: Path) -> list[tuple[str, str]]:
    """(label, 60-base sequence) for each row of the DNA object; a bad one-hot triple names row and base."""
    import rdata

    frame = rdata.read_rda(str(rda))["DNA"]
    cols = [f"V{i}" for i in range(1, 181)]
    missing = [c for c in [*cols, "Class"] if c not in frame.columns]
    if missing:
        raise ValueError(f"{rda}: object DNA lacks columns {missing[:5]}")
    bits = frame[cols].astype(int).to_numpy()
    rows = []
    for r, (row, cls) in enumerate(zip(bits, frame["Class"].astype(str))):
        bases = []
        for b in range(60):
            triple = tuple(int(v) for v in row[3 * b: 3 * b + 3])
            if triple not in CODES:
                raise ValueError(f"{rda}: row {r + 1}, base {b + 1}: one-hot {triple} is not A/C/G/T")
            bases.append(CODES[triple])
        if cls not in LABELS:
            raise ValueError(f"{rda}: row {r + 1}: class {cls!r} is not one of {sorted(LABELS)}")
        rows.append((LABELS[cls], "".join(bases)))
    return rows


def write_tsv(rows: list[tuple[str, str]], out: Path, seed: int) -> None:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if len(rows) != sum(n for _, n in SPLITS):
        raise ValueError(f"expected {sum(n for _, n in SPLITS)} rows, got {len(rows)}")
    lines, i = ["split\tlabel\tid\tsequence"], 0
    for split, n in SPLITS:
        for r in order[i: i + n]:
            label, seq = rows[r]
            lines.append(f"{split}\t{label}\tDNA_row{r + 1}\t{seq}")
        i += n
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:  # mtime=0: byte-identical reruns
        f.write(("\n".join(lines) + "\n").encode())
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rda", type=Path, help="mlbench DNA.rda (default: apt-get download r-cran-mlbench)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rda = args.rda or fetch_rda(Path(tmp))
        rows = decode_rows(rda)
    write_tsv(rows, args.out, args.seed)
    counts = {lab: sum(1 for r in rows if r[0] == lab) for lab in LABELS.values()}
    print(f"wrote {args.out} ({len(rows)} sequences of 60 nt; {counts})")


if __name__ == "__main__":
    main()
