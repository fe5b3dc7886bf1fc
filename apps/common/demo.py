"""Gradio glue every demo shares: local-only binding, analytics off, input caps, checkpoint lookup.

Import this module before gradio (it sets GRADIO_ANALYTICS_ENABLED before gradio reads it).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

__all__ = ["HOST", "launch", "demo_main", "cap_text", "checked_seed", "utf8", "find_checkpoint", "message_demo", "gr"]

HOST = "127.0.0.1"


def launch(demo: gr.Blocks, port: int | None = None, **kwargs):
    """Serve on 127.0.0.1 only (never share links); returns what ``Blocks.launch`` returns."""
    if kwargs.pop("share", False):
        raise ValueError("hiss demos are local-only; share links are disabled")
    kwargs.setdefault("max_file_size", "10mb")
    return demo.queue(max_size=16).launch(server_name=HOST, server_port=port, share=False, **kwargs)


def demo_main(build_demo, argv: list[str] | None = None, description: str | None = None,
              ckpt_help: str = "checkpoint folder (default: runs/<app>/pretrained, then the shipped one)") -> None:
    """The command line every app's demo has: ``python -m apps.<app>.demo [--ckpt DIR] [--port N] [--threads N]``."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help=ckpt_help)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    launch(build_demo(a.ckpt), port=a.port)


def cap_text(text: str, max_chars: int, what: str = "input") -> str:
    """Refuse over-long inputs with a message the UI shows, instead of hanging the CPU."""
    if len(text) > max_chars:
        raise gr.Error(f"{what} is {len(text):,} characters; this demo takes at most {max_chars:,}")
    return text


def checked_seed(seed) -> int | None:
    """A seed from a number box: empty -> None (random); else an integer torch accepts (0 <= seed < 2**63)."""
    if seed is None or (isinstance(seed, float) and seed != seed):
        return None
    if isinstance(seed, float) and not seed.is_integer():
        raise gr.Error(f"the seed must be a whole number, got {seed}")
    if not 0 <= seed < 2**63:
        raise gr.Error(f"the seed must be between 0 and 2**63 - 1, got {seed:g}")
    return int(seed)


def utf8(text: str, what: str = "the text") -> bytes:
    """``text`` as UTF-8, or a message naming where it cannot be (a lone surrogate pasted from a broken source)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        raise gr.Error(f"{what} has a character that is not valid Unicode (an unpaired surrogate, U+{code:04X}) at "
                       f"position {e.start}; remove it") from None


def find_checkpoint(candidates: list[str | Path], how_to_make: str, ckpt: str | Path | None = None) -> Path:
    """``ckpt`` when the user named one (it must exist: a mistyped path is an error, never a silent substitute),
    else the first of ``candidates`` holding a save_pretrained checkpoint (config.json), else a clear error."""
    if ckpt:
        if not (Path(ckpt) / "config.json").is_file():
            raise FileNotFoundError(f"{ckpt}: no checkpoint there (expected a folder with config.json). {how_to_make}")
        return Path(ckpt)
    for c in candidates:
        if c and (Path(c) / "config.json").is_file():
            return Path(c)
    tried = ", ".join(str(c) for c in candidates if c)
    raise FileNotFoundError(f"no checkpoint found (looked in: {tried}). {how_to_make}")


def message_demo(title: str, message: str) -> gr.Blocks:
    """A page that only explains something (a missing checkpoint, an app not built yet): what a demo shows
    instead of crashing, so a launcher of several demos keeps serving the others."""
    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"### {title}\n\n{message}")
    return demo
