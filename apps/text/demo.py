"""Gradio demo: prompt -> streamed byte-level continuation, per-byte surprisal colouring, state cartridges.

    python -m apps.text.demo [--ckpt DIR] [--port 7860]      # http://127.0.0.1:7860 (local only)

``build_demo(ckpt)`` returns the Blocks (mounted as a tab by ``python -m demos``); the handlers live on
``TextDemo`` so they can be called without a server.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from apps.common.demo import cap_text, checked_seed, demo_main, find_checkpoint, gr, message_demo, utf8
from apps.common.errors import run_cli
from apps.common.paths import default_checkpoints
from apps.text.data import BOS
from apps.text.generate import (
    HOW_TO_TRAIN,
    SHIPPED,
    Utf8Stream,
    byte_surprisal,
    load_cartridge,
    load_model,
    save_cartridge,
    stream_bytes,
)
from ssm_core import ModelState

__all__ = ["TextDemo", "build_demo", "main"]

MAX_PROMPT_CHARS = 20_000  # prefill cost grows linearly; keeps a CPU request to a few seconds
MAX_NEW_BYTES = 2_000
# surprisal buckets (bits per byte) -> colours from calm to alarming
BUCKETS = [(1.0, "< 1 bit"), (2.5, "1-2.5 bits"), (4.0, "2.5-4 bits"), (6.0, "4-6 bits"), (math.inf, "> 6 bits")]
COLORS = {"< 1 bit": "#d9f2d9", "1-2.5 bits": "#fff3b0", "2.5-4 bits": "#ffd59e", "4-6 bits": "#ffab91",
          "> 6 bits": "#ef6f6c"}


def bucket(bits: float) -> str | None:
    if math.isnan(bits):
        return None
    return next(name for limit, name in BUCKETS if bits < limit)


def highlight(data: bytes, bits: list[float]) -> list[tuple[str, str | None]]:
    """Characters with their surprisal bucket (a multi-byte character gets the sum of its bytes' bits;
    invalid bytes show as U+FFFD)."""
    out, dec, acc = [], Utf8Stream(), 0.0
    for b, s in zip(data, bits):
        acc += 0.0 if math.isnan(s) else s
        ch = dec.feed(bytes([b]))
        if ch:
            out.append((ch, bucket(acc) if not (math.isnan(s) and acc == 0.0) else None))
            acc = 0.0
    tail = dec.flush()
    if tail:
        out.append((tail, bucket(acc)))
    return out


class TextDemo:
    """The demo's state and handlers (plain Python: tests call them directly)."""

    def __init__(self, ckpt: str | Path):
        self.ckpt = Path(ckpt)
        self.model = load_model(ckpt)
        self.bos = self.model.config.vocab_size > BOS
        self.workdir = Path(tempfile.mkdtemp(prefix="hiss_text_demo_"))

    def generate(self, prompt: str, max_bytes: int = 200, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 0.95, seed: int | None = 0, cartridge: ModelState | None = None
                 ) -> Iterator[tuple[str, list, str]]:
        """Yields (continuation so far, surprisal highlights, status); highlights come with the last yield."""
        cap_text(prompt, MAX_PROMPT_CHARS, "the prompt")
        if not prompt:
            raise gr.Error("type a prompt" + (" (at least one character continues the cartridge)" if cartridge
                                              else ""))
        utf8(prompt, "the prompt")
        max_bytes = max(1, min(int(max_bytes), MAX_NEW_BYTES))
        seed = checked_seed(seed)
        dec, text, new = Utf8Stream(), "", bytearray()
        t0 = last = time.perf_counter()
        for t in stream_bytes(self.model, prompt, max_bytes, temperature=float(temperature), top_k=int(top_k),
                              top_p=float(top_p), seed=seed, state=cartridge, bos=self.bos):
            if t < 256:
                new.append(t)
            text += dec.feed([t])
            if time.perf_counter() - last > 0.1:  # ~10 UI updates a second, not one per byte
                last = time.perf_counter()
                yield text, [], f"generating... {len(new)} bytes"
        text += dec.flush()
        dt = time.perf_counter() - t0
        data = prompt.encode() + bytes(new)
        bits = byte_surprisal(self.model, data, state=cartridge, bos=self.bos and cartridge is None)  # len(data)
        scored = [b for b in bits[len(prompt.encode()):] if not math.isnan(b)]
        mean = sum(scored) / len(scored) if scored else float("nan")
        source = "cartridge + prompt" if cartridge is not None else "prompt"
        yield text, highlight(data, bits), (f"{len(new)} bytes in {dt:.1f} s ({len(new) / max(dt, 1e-9):.0f} "
                                            f"bytes/s) from the {source}; continuation {mean:.2f} bits/byte")

    def save(self, prompt: str) -> tuple[str, str]:
        """Prefill the prompt once and write its state cartridge; returns (file path, status)."""
        cap_text(prompt, MAX_PROMPT_CHARS, "the prompt")
        if not prompt:
            raise gr.Error("type the document to save its state")
        path = self.workdir / f"prompt_{int(time.time() * 1000)}.state"
        state = save_cartridge(path, self.model, prompt, bos=self.bos)
        return str(path), f"saved the state after {state.seqlen_offset:,} tokens ({path.stat().st_size:,} bytes)"

    def load(self, file) -> tuple[ModelState | None, str]:
        """Read an uploaded cartridge. One that cannot be used (corrupt, another model's) is refused with the
        reason, and the previously loaded cartridge is dropped: generation never silently uses a stale one."""
        if file is None:
            return None, "no cartridge: generation starts from the prompt alone"
        path = getattr(file, "name", file)
        try:
            state = load_cartridge(path, self.model)
        except (ValueError, OSError, KeyError) as e:
            message = f"cannot use this cartridge ({Path(path).name}): {e}"
            gr.Warning(message)
            return None, f"**{message}** Generation starts from the prompt alone."
        return state, (f"cartridge loaded: the next prompt continues a {state.seqlen_offset:,}-token context "
                       "(type at least one character)")


def build_demo(ckpt: str | Path | None = None) -> gr.Blocks:
    """The text demo; with no usable checkpoint, a page that says how to make one."""
    try:
        path = find_checkpoint(default_checkpoints("text", SHIPPED), HOW_TO_TRAIN, ckpt)
        app = TextDemo(path)
    except (FileNotFoundError, ValueError) as e:
        return message_demo("Byte-level text (MambaByte)", f"**No text model available.** {e}")
    with gr.Blocks(title="hiss: byte-level text") as demo:
        gr.Markdown(f"### Byte-level Mamba\nCheckpoint `{path}`: {sum(p.numel() for p in app.model.parameters()):,} "
                    "parameters, one byte per step, constant memory. Colours: surprisal of each character given "
                    "everything before it.")
        cart = gr.State(None)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=5, value="The Python tutorial", elem_id="text-prompt",
                                    max_length=MAX_PROMPT_CHARS)
                with gr.Row():
                    max_bytes = gr.Slider(1, MAX_NEW_BYTES, value=200, step=1, label="New bytes")
                    temperature = gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature (0: greedy)")
                with gr.Row():
                    top_k = gr.Slider(0, 256, value=0, step=1, label="Top-k (0: off)")
                    top_p = gr.Slider(0.0, 1.0, value=0.95, step=0.01, label="Top-p (0 or 1: off)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Generate", variant="primary", elem_id="text-generate")
            with gr.Column(scale=2):
                with gr.Accordion("State cartridge", open=False):
                    gr.Markdown("Save the prompt's state once; later prompts continue it without re-reading it.")
                    save_btn = gr.Button("Save prompt state")
                    cart_file = gr.File(label="Cartridge (.state): download, or upload one to continue from it",
                                        file_types=[".state"], elem_id="text-cartridge")
                    use_cart = gr.Checkbox(label="Continue from the uploaded cartridge", value=False)
        status = gr.Markdown(elem_id="text-status")
        output = gr.Textbox(label="Continuation", lines=8, interactive=False, elem_id="text-output")
        colours = gr.HighlightedText(label="Surprisal (prompt + continuation)", color_map=COLORS,
                                     combine_adjacent=True, show_legend=True, elem_id="text-surprisal")

        def on_generate(p, n, t, k, tp, s, use, state):
            if use and state is None:
                raise gr.Error("'Continue from the uploaded cartridge' is ticked but no usable cartridge is loaded")
            yield from app.generate(p, n, t, k, tp, s, state if use else None)

        # clear the last result first: after an error nothing stale stays on screen
        shown = [output, colours, status]
        run.click(lambda: ("", [], ""), None, shown, queue=False).then(
            on_generate, [prompt, max_bytes, temperature, top_k, top_p, seed, use_cart, cart], shown)
        save_btn.click(app.save, [prompt], [cart_file, status])
        cart_file.upload(app.load, [cart_file], [cart, status])
    return demo


def main(argv: list[str] | None = None) -> None:
    demo_main(build_demo, argv, __doc__)


if __name__ == "__main__":
    run_cli(main)
