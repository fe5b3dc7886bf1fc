"""The README's API tour must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python examples"
    scope: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), scope)
    assert scope["logits"].shape == (1, 32, 256)
    assert scope["more"].shape == (1, 52)
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()


DOCS = [README, *sorted((README.parent / "docs").glob("*.md"))]


def documented_commands() -> dict[str, set[str]]:
    """{module: {doc files}} for every ``python -m module`` the README and docs/ show (code blocks and inline)."""
    found: dict[str, set[str]] = {}
    for doc in DOCS:
        for module in re.findall(r"python -m ([A-Za-z_][\w.]*[\w])", doc.read_text()):
            found.setdefault(module, set()).add(doc.name)
    return found


def test_every_documented_command_exists():
    """Each ``python -m X`` the docs show names a module of ours that can run: it imports, and has a ``main``
    (or is a package with ``__main__``). Renamed commands keep an alias, so old instructions still work."""
    import importlib
    import importlib.util

    ours = ("apps.", "benchmarks.", "experiments.", "demos", "datasets.")
    missing = []
    for module, docs in sorted(documented_commands().items()):
        if not module.startswith(ours):
            continue  # pytest, pip, ...
        spec = importlib.util.find_spec(module)
        if spec is None:
            missing.append(f"{module} (in {', '.join(sorted(docs))}): no such module")
            continue
        if spec.submodule_search_locations:  # a package: python -m runs its __main__
            if importlib.util.find_spec(f"{module}.__main__") is None:
                missing.append(f"{module} (in {', '.join(sorted(docs))}): package without __main__")
            continue
        if not hasattr(importlib.import_module(module), "main"):
            missing.append(f"{module} (in {', '.join(sorted(docs))}): no main()")
    assert not missing, "\n".join(missing)
    assert len(documented_commands()) > 10  # the scan itself works
