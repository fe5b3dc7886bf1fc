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
