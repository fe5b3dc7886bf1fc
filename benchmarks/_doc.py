"""Benchmarks write their results into marked blocks of a markdown file, each script only its own."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path


def write_section(doc: Path, key: str, block: str) -> None:
    """Replace (or append) the ``<!-- key:begin --> ... <!-- key:end -->`` block of ``doc`` with ``block``,
    atomically (a reader never sees half a file; other scripts' blocks are left as they are)."""
    begin, end = f"<!-- {key}:begin -->", f"<!-- {key}:end -->"
    doc.parent.mkdir(parents=True, exist_ok=True)
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = doc.with_suffix(doc.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def publish(block: str, key: str, doc: str | Path, rows: list = (), json_path: str | None = None,
            write_doc: bool = True) -> None:
    """Print a benchmark's markdown block, save its rows (dataclasses) as JSON when asked, and replace the
    ``key`` block of ``doc`` unless told not to."""
    print(block)
    if json_path:
        Path(json_path).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if write_doc:
        write_section(Path(doc), key, block)
        print(f"wrote the {key} block of {doc}")

