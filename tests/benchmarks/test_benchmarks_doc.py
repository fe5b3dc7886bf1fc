"""Benchmark scripts share one markdown file: each replaces only its own marked block."""

from benchmarks._doc import write_section


def test_sections_replace_only_their_own_block(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    write_section(doc, "scan", "scan v1")
    write_section(doc, "long_dna", "long v1")
    write_section(doc, "scan", "scan v2")
    text = doc.read_text()
    assert "scan v2" in text and "scan v1" not in text and "long v1" in text
    assert text.index("<!-- scan:begin -->") < text.index("<!-- long_dna:begin -->")
    assert not list(doc.parent.glob("*.tmp"))
