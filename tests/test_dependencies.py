"""The dependency rule, read from the source: apps -> ssm_core -> kernels, one way.

kernels never imports ssm_core, apps, demos, benchmarks or experiments; ssm_core never imports apps, demos,
benchmarks or experiments; an app imports only ssm_core, kernels' public modules and apps.common, never another
app; apps.common imports no app. No package reaches into another's private names (a module or name starting with
"_"). The rule is checked on every import statement, including the ones inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssm_core", "kernels", "apps", "demos", "benchmarks", "experiments")


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) for every import in a file; relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def sources(top: str) -> list[Path]:
    return sorted(p for p in (ROOT / top).rglob("*.py") if "checkpoints" not in p.parts)


def violations(path: Path) -> list[str]:
    rel = path.relative_to(ROOT)
    top = rel.parts[0]
    app = rel.parts[1] if top == "apps" and len(rel.parts) > 2 else None
    bad = []
    for line, module, names in imports(path):
        parts = module.split(".")
        target = parts[0]
        where = f"{rel}:{line}: imports {module}"
        if target not in PACKAGES:
            continue
        if top == "kernels" and target != "kernels":
            bad.append(f"{where} (kernels imports nothing of hiss)")
        if top == "ssm_core" and target not in ("ssm_core", "kernels"):
            bad.append(f"{where} (ssm_core never imports apps, demos, benchmarks, experiments)")
        if top == "apps" and target not in ("apps", "ssm_core", "kernels"):
            bad.append(f"{where} (apps import ssm_core and apps.common only)")
        if top == "apps" and target == "apps" and len(parts) > 1:
            other = parts[1]
            if app == "common" and other != "common":
                bad.append(f"{where} (apps.common imports no app)")
            elif app not in (None, "common") and other not in (app, "common"):
                bad.append(f"{where} (apps never import each other)")
        if target != top:  # private names across packages
            private = [p for p in [*parts[1:], *names] if p.startswith("_") and not p.endswith("__")]
            if private:
                bad.append(f"{where}: private name(s) {private} of another package")
    return bad


@pytest.mark.parametrize("top", [p for p in PACKAGES if (ROOT / p).is_dir()])
def test_dependencies_point_one_way(top):
    bad = [v for path in sources(top) for v in violations(path)]
    assert not bad, "\n".join(bad)


def test_the_checker_catches_each_kind_of_violation(tmp_path):
    """The rule above must be able to fail: plant one violation of each kind in a fake tree."""
    planted = {
        "kernels/k.py": "import ssm_core\n",
        "ssm_core/s.py": "from apps.common import x\n",
        "apps/text/t.py": "from apps.genomics.data import encode\n",
        "apps/common/c.py": "def f():\n    from apps.text import data\n",
        "apps/vision/v.py": "from ssm_core._io import atomic_write\n",
        "apps/audio/a.py": "from ssm_core.modules.mamba import _helper\n",
    }
    for rel, text in planted.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = {rel: violations(tmp_path / rel) for rel in planted}
    finally:
        ROOT = saved
    assert all(found.values()), found
    (tmp_path / "apps/text/ok.py").write_text("from apps.common import load_model\nfrom ssm_core import Mamba\n")
    ROOT = tmp_path
    try:
        assert violations(tmp_path / "apps/text/ok.py") == []
    finally:
        ROOT = saved
