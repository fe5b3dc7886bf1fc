"""Genus-of-origin windows from 16 complete bacterial genomes (E. coli, H. pylori, S. aureus, V. cholerae).

    python datasets/recipes/genus.py                           # apt-get download ragout-examples, sample
    python datasets/recipes/genus.py --examples DIR            # an unpacked .../doc/ragout/examples folder
    python datasets/recipes/genus.py --length 2000 --train-per-genus 1000
    python datasets/recipes/genus.py --splits train --train-per-genus 5000 --seed 1 \
        --out datasets/genus/genus_train_5000.tsv.gz        # a larger training sample only (finetune data.train_path)

Source: Debian ``ragout-examples`` (``usr/share/doc/ragout/examples/<Genus>/references/<strain>.fasta.gz``).
One strain per genus is held out for the test split (the last in sorted order), so test windows come from
genomes the model never saw; validation windows come from the training strains, from genome coordinates
disjoint from the training windows (the last 10% of each record). Windows containing anything but A/C/G/T
are redrawn; each window is taken from the forward or reverse strand at random. Output
``datasets/samples/genus_windows.tsv.gz``: columns ``split label id sequence`` (id = strain:record:start-end
and strand), small enough to commit with the defaults.
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
DEFAULT_OUT = ROOT / "datasets" / "samples" / "genus_windows.tsv.gz"
EXAMPLES_IN_DEB = "usr/share/doc/ragout/examples"
GENERA = {"E.Coli": "Escherichia", "H.Pylori": "Helicobacter", "S.Aureus": "Staphylococcus",
          "V.Cholerae": "Vibrio"}
COMP = str.maketrans("ACGT", "TGCA")
SPLITS = ("train", "val", "test")


def fetch_examples(workdir: Path) -> Path:
    subprocess.run(["apt-get", "download", "ragout-examples"], cwd=workdir, check=True)
    deb = next(workdir.glob("ragout-examples_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], check=True)
    return workdir / "root" / EXAMPLES_IN_DEB


def read_fasta(path: Path) -> dict[str, str]:
    """All records of a (gzip) FASTA as upper-case strings (Bio.SeqIO does the parsing)."""
    from Bio import SeqIO

    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        recs = {r.id: str(r.seq).upper() for r in SeqIO.parse(f, "fasta")}
    if not recs:
        raise ValueError(f"{path}: no FASTA records")
    return recs


def windows(genome: dict[str, str], n: int, length: int, rng: random.Random, part: tuple[float, float],
            strain: str) -> list[tuple[str, str]]:
    """n windows (id, sequence) whose starts lie in the fraction ``part`` of each record (by length)."""
    names = [k for k, v in genome.items() if len(v) >= 10 * length]
    if not names:
        raise ValueError(f"{strain}: no record of at least {10 * length} bases")
    weights = [len(genome[k]) for k in names]
    out, tries = [], 0
    while len(out) < n:
        tries += 1
        if tries > 50 * n:
            raise ValueError(f"{strain}: could not draw {n} clean windows of {length} bases")
        name = rng.choices(names, weights)[0]
        seq = genome[name]
        lo, hi = int(part[0] * len(seq)), int(part[1] * len(seq)) - length
        start = rng.randrange(lo, hi)
        w = seq[start: start + length]
        if set(w) - set("ACGT"):
            continue
        strand = rng.choice("+-")
        if strand == "-":
            w = w.translate(COMP)[::-1]
        out.append((f"{strain}:{name}:{start}-{start + length}({strand})", w))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=Path, help="unpacked ragout examples folder (default: apt-get download)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--train-per-genus", type=int, default=400, help="shared evenly by the training strains")
    p.add_argument("--val-per-genus", type=int, default=60)
    p.add_argument("--test-per-genus", type=int, default=100, help="all from the held-out strain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS,
                   help="write only these splits (e.g. train: a larger training sample beside the bundled test rows; "
                        "use another --seed, the windows are drawn from the same parts of the same strains)")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    lines = ["split\tlabel\tid\tsequence"]
    with tempfile.TemporaryDirectory() as tmp:
        examples = args.examples or fetch_examples(Path(tmp))
        for folder, genus in GENERA.items():
            strains = sorted((examples / folder / "references").glob("*.fasta*"))
            if len(strains) < 2:
                raise FileNotFoundError(f"{examples / folder / 'references'}: need >= 2 strain FASTAs, "
                                        f"found {len(strains)}")
            for i, path in enumerate(strains):
                strain = path.name.split(".")[0]
                genome = read_fasta(path)
                k = len(strains) - 1  # training strains: balance genera, not strains
                if i == k:  # held-out strain
                    plan = [("test", args.test_per_genus, (0.0, 1.0))]
                else:
                    plan = [("train", args.train_per_genus // k, (0.0, 0.9)),
                            ("val", args.val_per_genus // k, (0.9, 1.0))]
                for split, n, part in plan:
                    if split not in args.splits:
                        continue
                    for wid, w in windows(genome, n, args.length, rng, part, strain):
                        lines.append(f"{split}\t{genus}\t{wid}\t{w}")
                print(f"{genus:15s} {strain:20s} {'test (held out)' if i == len(strains) - 1 else 'train/val'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    with gzip.GzipFile(tmp_out, "wb", mtime=0) as f:
        f.write(("\n".join(lines) + "\n").encode())
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out} ({len(lines) - 1} windows of {args.length} bases, "
          f"{args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
