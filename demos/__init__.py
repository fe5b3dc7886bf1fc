"""One launcher for every app's Gradio demo:  python -m demos [genomics|text|all] [--port N]

Each app exposes ``apps.<app>.demo.build_demo(ckpt=None) -> gr.Blocks``; it is imported only when asked for.
An app that is not installed yet, or whose demo fails to build, becomes a tab that says why, so the
others keep working. Served on 127.0.0.1 only, analytics off (apps.common.demo).
"""

from __future__ import annotations

import importlib
import traceback

from apps.common.demo import gr, message_demo

__all__ = ["APPS", "build", "build_all"]

# name -> (module with build_demo, tab title)
APPS: dict[str, tuple[str, str]] = {
    "genomics": ("apps.genomics.demo", "DNA (genomics)"),
    "text": ("apps.text.demo", "Byte-level text"),
    "audio": ("apps.audio.demo", "Audio (waveform U-Net)"),
    "vision": ("apps.vision.demo", "Vision (Vim)"),
}


def build(name: str, ckpt: str | None = None) -> gr.Blocks:
    """One app's demo, or a page explaining why it is not available."""
    if name not in APPS:
        raise ValueError(f"unknown demo {name!r}; choose from {sorted(APPS)} or 'all'")
    module_name, title = APPS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the app itself is missing, not one of its imports
            return message_demo(title, f"The `{name}` app is not part of this checkout yet (`{module_name}` "
                                       "was not found).")
        raise
    try:
        return module.build_demo(ckpt)
    except Exception as e:  # noqa: BLE001 - one broken app must not take the other tabs down; say why
        traceback.print_exc()
        return message_demo(title, f"This demo could not start: `{type(e).__name__}: {e}`")


def build_all(ckpts: dict[str, str] | None = None) -> gr.Blocks:
    """Every app's demo as a tab of one page."""
    ckpts = ckpts or {}
    # Built outside the page, then rendered once in its tab: since Gradio 6 a Blocks created inside an open
    # Blocks is drawn where it is created, so building it in the tab and calling render() drew it twice.
    pages = {name: build(name, ckpts.get(name)) for name in APPS}
    with gr.Blocks(title="hiss demos") as app:
        gr.Markdown("## hiss demos\nOne Mamba core, several domains. Everything runs locally on this machine.")
        for name, (_, title) in APPS.items():
            with gr.Tab(title, id=name):
                pages[name].render()
    return app
