"""Benchmarks write their results into marked blocks of a markdown file, each script only its own."""

from __future__ import annotations

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
