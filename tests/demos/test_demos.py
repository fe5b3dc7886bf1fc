"""The text demo's handlers (no server) and the demos launcher (tabs, missing apps, missing checkpoints)."""

from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch

import demos
from apps.common.demo import gr
from apps.text import demo as text_demo
from apps.text.demo import TextDemo, build_demo, highlight
from ssm_core import MambaConfig, MambaLMHeadModel

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("text_ckpt")
    MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=256, ssm_cfg={"d_state": 8})).save_pretrained(d)
    return d


def markdown_text(blocks: gr.Blocks) -> str:
    return "\n".join(str(b.value) for b in blocks.blocks.values() if isinstance(b, gr.Markdown))


def test_no_checkpoint_gives_a_clear_page(tmp_path, monkeypatch):
    monkeypatch.setattr(text_demo, "default_checkpoints", lambda *a, **k: [])
    for ckpt in (None, tmp_path / "missing"):
        page = markdown_text(build_demo(ckpt))
        assert "No text model available" in page and "python -m apps.text.train" in page


def test_generate_streams_and_colours(ckpt):
    app = TextDemo(ckpt)
    steps = list(app.generate("Hello wörld", max_bytes=60, temperature=1.0, top_k=20, top_p=0.9, seed=1))
    text, marks, status = steps[-1]
    assert "bytes in" in status and "bits/byte" in status
    assert all(text.startswith(s[0]) for s in steps)  # updates only ever extend the text
    shown = "".join(ch for ch, _ in marks)
    assert shown == "Hello wörld" + text  # prompt + continuation, whole characters
    assert marks[0][1] is None and all(lab in text_demo.COLORS for _, lab in marks[1:])
    with pytest.raises(gr.Error, match="at most"):
        list(app.generate("x" * (text_demo.MAX_PROMPT_CHARS + 1)))
    with pytest.raises(gr.Error, match="type a prompt"):
        list(app.generate(""))


def test_cartridge_round_trip_in_the_demo(ckpt, tmp_path):
    app = TextDemo(ckpt)
    doc = "A long document that we read only once. " * 20
    path, msg = app.save(doc)
    assert "saved the state" in msg
    state, msg = app.load(path)
    assert state.seqlen_offset == len(doc.encode()) and "cartridge loaded" in msg
    a = list(app.generate(" next", 30, temperature=0.0, cartridge=state))[-1][0]
    b = list(app.generate(doc + " next", 30, temperature=0.0))[-1][0]
    assert a == b
    other = tmp_path / "other"
    MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=256)).save_pretrained(other)
    state, msg = TextDemo(other).load(path)  # refused with the reason, and no cartridge stays loaded
    assert state is None and "different model" in msg
    assert app.load(None)[0] is None


def test_garbage_cartridge_upload_says_why_and_drops_the_old_one(ckpt, tmp_path):
    app = TextDemo(ckpt)
    junk = tmp_path / "junk.state"
    junk.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    state, msg = app.load(str(junk))
    assert state is None and "cannot use this cartridge (junk.state)" in msg


@pytest.mark.parametrize("seed, prompt, message", [
    (1e30, "hi", "seed must be between 0 and 2\\*\\*63 - 1"),
    (1.5, "hi", "whole number"),
    (0, "a\ud800b", "unpaired surrogate, U\\+D800\\) at position 1"),
])
def test_demo_refuses_bad_seeds_and_lone_surrogates_with_a_message(ckpt, seed, prompt, message):
    with pytest.raises(gr.Error, match=message):
        list(TextDemo(ckpt).generate(prompt, 5, seed=seed))


def test_highlight_groups_multibyte_characters():
    data = "aé".encode() + b"\xff"
    marks = highlight(data, [math.nan, 0.5, 3.0, 7.0])
    assert [ch for ch, _ in marks] == ["a", "é", "\ufffd"]
    assert marks[0][1] is None and marks[2][1] == "> 6 bits"
    assert marks[1][1] == "2.5-4 bits"  # 0.5 + 3.0 bits: the sum over the two bytes of é


def test_launcher_tabs_and_missing_apps(ckpt, monkeypatch):
    monkeypatch.setattr(demos, "APPS", {"ghost": ("apps.ghost.demo", "Ghost app"), **demos.APPS})
    page = markdown_text(demos.build("ghost"))
    assert "not part of this checkout" in page
    app = demos.build_all({"text": str(ckpt)})
    tabs = [b.label for b in app.blocks.values() if isinstance(b, gr.Tab)]
    assert {"Ghost app", "Byte-level text", "DNA (genomics)"} <= set(tabs)
    assert "not part of this checkout" in markdown_text(app)
    with pytest.raises(ValueError, match="unknown demo"):
        demos.build("nope")


def test_launcher_shows_a_failing_demo_instead_of_crashing(monkeypatch):
    def boom(ckpt=None):
        raise RuntimeError("kaput")

    monkeypatch.setattr(text_demo, "build_demo", boom)
    assert "could not start: `RuntimeError: kaput`" in markdown_text(demos.build("text"))


def test_launcher_cli_rejects_ckpt_with_all():
    from demos.__main__ import main

    with pytest.raises(SystemExit):
        main(["all", "--ckpt", "x"])


def layout_nodes(node):
    yield node
    for child in node.get("children", []):
        yield from layout_nodes(child)


def component_kinds(cfg: dict, root: dict) -> Counter:
    """How many components of each type are drawn under ``root`` of a Blocks config (root itself excluded)."""
    kinds = {c["id"]: c["type"] for c in cfg["components"]}
    return Counter(kinds[n["id"]] for n in layout_nodes(root) if n is not root and n["id"] in kinds)


def test_launcher_draws_each_app_once_in_its_own_tab(ckpt):
    """Gradio 6 draws a Blocks built inside an open Blocks where it is built; the launcher used to render it
    again, so every app appeared twice and the first copy's buttons filled the second copy."""
    app = demos.build_all({"text": str(ckpt)})
    cfg = app.get_config_file()
    drawn = Counter(n["id"] for n in layout_nodes(cfg["layout"]))
    assert max(drawn.values()) == 1, "a component is drawn more than once"
    elem_ids = Counter(c["props"].get("elem_id") for c in cfg["components"] if c["props"].get("elem_id"))
    assert elem_ids["text-prompt"] == 1 and elem_ids["text-generate"] == 1
    comps = {c["id"]: c for c in cfg["components"]}
    tabs = {comps[n["id"]]["props"]["label"]: n for n in layout_nodes(cfg["layout"])
            if comps.get(n["id"], {}).get("type") == "tabitem"}
    events = 0
    for name, (_, title) in demos.APPS.items():
        alone = demos.build(name, str(ckpt) if name == "text" else None).get_config_file()
        want = component_kinds(alone, alone["layout"])
        assert want and component_kinds(cfg, tabs[title]) == want, f"tab {title!r} is not one copy of its app"
        events += len(alone["dependencies"])
    assert len(cfg["dependencies"]) == events  # every app's event handlers, once


def test_launcher_cli_says_one_line_when_the_port_is_taken(tmp_path):
    """python -m demos goes through apps.common.errors.run_cli: an OSError is one line and status 2."""
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "demos", "text", "--port", str(port), "--ckpt", str(tmp_path),
                            "--threads", "1"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "HISS_DEBUG": ""})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: Cannot find empty port in range: {port}-{port}")
    assert "Traceback" not in r.stderr
