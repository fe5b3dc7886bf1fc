"""Real text for apps/text, fetched from Debian packages (the only source reachable on these machines).

    python datasets/recipes/text.py sample                  # rebuild datasets/samples/python_docs (1.2 MB)
    python datasets/recipes/text.py pydocs  data/pydocs     # all 11 MB of Python 3.11 doc sources (.rst.txt)
    python datasets/recipes/text.py fortunes data/fortunes  # fortune cookie files (2.7 MB)
    python datasets/recipes/text.py stdlib  data/stdlib     # this interpreter's stdlib .py files (31 MB)

Every output is a folder of plain files: apps/text reads any folder (``--data.paths data/pydocs``) and
splits it into train/valid/test by file. With internet access, PG19 (a folder of books with train/
validation/test subfolders) and enwik8 (one 100 MB file, the usual 90/5/5 MB split) are read by
``apps.text.data.pg19_splits`` / ``enwik8_splits``; download them yourself:
  PG19:   gsutil -m cp -r gs://deepmind-gutenberg/{train,validation,test} data/pg19/
  enwik8: curl -O http://mattmahoney.net/dc/enwik8.zip && unzip enwik8.zip -d data/

Licences: the Python documentation is under the PSF licence (its text is copied beside the sample);
fortunes are public-domain quotations (Debian's copyright file); the stdlib is PSF-licensed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO / "datasets" / "samples" / "python_docs"
DOCS = "usr/share/doc/python3.11/html/_sources"
SAMPLE_PARTS = ("tutorial", "howto", "faq")  # English prose plus code examples, ~1.2 MB together


def debian_files(package: str, work: Path) -> Path:
    """Download one .deb (not its dependencies) and unpack it; returns the unpacked root."""
    if not shutil.which("apt-get"):
        sys.exit(f"{package}: apt-get not found; this recipe needs a Debian/Ubuntu machine")
    subprocess.run(["apt-get", "download", package], cwd=work, check=True)
    debs = sorted(work.glob(f"{package}_*.deb"))
    if not debs:
        sys.exit(f"{package}: apt-get download produced no .deb in {work} (run apt-get update first?)")
    root = work / "root"
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return root


def copy_tree(files: list[Path], base: Path, out: Path) -> int:
    total = 0
    for f in files:
        dst = out / f.relative_to(base)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst)
        total += f.stat().st_size
    return total


def psf_licence(root: Path) -> str:
    """The PSF licence section of the python3.11-doc copyright file."""
    text = (root / "usr/share/doc/python3.11-doc/copyright").read_text(errors="replace")
    start = text.index("PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2")
    end = text.index("BEOPEN.COM LICENSE AGREEMENT", start)
    return text[start:end].rstrip() + "\n"


def cmd_sample(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = debian_files("python3.11-doc", Path(tmp))
        base = root / DOCS
        files = sorted(f for part in SAMPLE_PARTS for f in (base / part).rglob("*.rst.txt"))
        tmp_out = Path(tempfile.mkdtemp(dir=out.parent, prefix=".python_docs."))
        total = copy_tree(files, base, tmp_out)
        (tmp_out / "LICENSE").write_text(psf_licence(root))
        (tmp_out / "README.md").write_text(
            "# python_docs\n\nThe reStructuredText sources of the Python 3.11 documentation's "
            f"{', '.join(SAMPLE_PARTS)} sections ({len(files)} files, {total:,} bytes), from Debian's "
            "`python3.11-doc` package (`usr/share/doc/python3.11/html/_sources/`). PSF licence: see LICENSE.\n"
            "Rebuild with `python datasets/recipes/text.py sample`.\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp_out, out)  # the old sample is replaced only once the new one is complete
    print(f"{out}: {len(files)} files, {total:,} bytes")


def cmd_pydocs(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = debian_files("python3.11-doc", Path(tmp))
        base = root / DOCS
        total = copy_tree(sorted(base.rglob("*.rst.txt")), base, out)
        (out / "LICENSE").write_text(psf_licence(root))
    print(f"{out}: {total:,} bytes")


def cmd_fortunes(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = debian_files("fortunes", Path(tmp))
        base = root / "usr/share/games/fortunes"
        # the text files only: skip the strfile indexes (.dat) and the .u8 symlinks
        files = sorted(f for f in base.iterdir() if f.is_file() and not f.is_symlink() and f.suffix not in (".dat",))
        total = copy_tree(files, base, out)
    print(f"{out}: {total:,} bytes")


def cmd_stdlib(out: Path) -> None:
    base = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(Path(p) for p in glob.glob(str(base / "**" / "*.py"), recursive=True)
                   if "site-packages" not in Path(p).parts)
    total = copy_tree(files, base, out)
    print(f"{out}: {len(files)} files, {total:,} bytes")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["sample", "pydocs", "fortunes", "stdlib"])
    p.add_argument("out", nargs="?", type=Path, help="output folder (sample: datasets/samples/python_docs)")
    a = p.parse_args(argv)
    out = a.out or (SAMPLE_DIR if a.what == "sample" else None)
    if out is None:
        p.error(f"{a.what}: give an output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.what != "sample":
        out.mkdir(exist_ok=True)
    {"sample": cmd_sample, "pydocs": cmd_pydocs, "fortunes": cmd_fortunes, "stdlib": cmd_stdlib}[a.what](out)


if __name__ == "__main__":
    main()
