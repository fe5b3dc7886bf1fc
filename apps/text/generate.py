"""Streaming byte generation, UTF-8 safe, with state cartridges and optional speculative decoding.

    python -m apps.text.generate --prompt "The tutorial" --max-bytes 300 --temperature 0.8 --top-p 0.95
    python -m apps.text.generate --ckpt runs/text/pretrained --prompt "..."               # your own model
    python -m apps.text.generate --ckpt DIR --prompt-file book.txt --save-state book.state   # prefill once
    python -m apps.text.generate --ckpt DIR --state book.state --prompt "\n\nChapter 2"     # continue later
    python -m apps.text.generate --draft apps/text/assets/byte_mamba_draft --prompt "..."     # speculative

With no ``--ckpt``: ``runs/text/pretrained`` (your ``python -m apps.text.train``) if it exists, else the shipped
``apps/text/assets/byte_mamba`` (docs/text.md: what it was trained on and how well it does).

A model emits bytes; a character may span up to 4 of them. Text is decoded incrementally: a partial
character is held back until its last byte arrives, and invalid sequences become U+FFFD.
"""

from __future__ import annotations

import argparse
import codecs
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from apps.common import load_model as common_load_model
from apps.common import prefill, sequence_nll
from apps.common.errors import run_cli
from apps.common.paths import resolve_checkpoint
from apps.text.data import BOS, EOS, encode
from apps.text.model import TextLMModule
from ssm_core import MambaLMHeadModel, ModelState, load_state, save_state
from ssm_core.models.speculative import SpecStats

__all__ = ["Utf8Stream", "SHIPPED", "SHIPPED_DRAFT", "default_model", "load_model",
           "save_cartridge", "load_cartridge", "stream_bytes", "stream_text",
           "byte_surprisal"]


class Utf8Stream:
    """Incremental bytes -> text: never emits half a character; invalid bytes become U+FFFD.
    Special ids (BOS/EOS/PAD >= 256) are not bytes and are dropped."""

    def __init__(self):
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_ids: list[int] | bytes) -> str:
        return self._dec.decode(bytes(t for t in token_ids if t < 256))

    def flush(self) -> str:
        """End of stream: a dangling partial character becomes U+FFFD."""
        return self._dec.decode(b"", final=True)


SHIPPED = Path(__file__).resolve().parent / "assets" / "byte_mamba"
SHIPPED_DRAFT = Path(__file__).resolve().parent / "assets" / "byte_mamba_draft"
HOW_TO_TRAIN = "Train one with `python -m apps.text.train` (about 4 minutes on CPU) or pass --ckpt DIR."


def default_model(ckpt: str | Path | None = None) -> Path:
    """The named checkpoint (load_model says what is wrong with it), else runs/text/pretrained, else the shipped
    byte model."""
    return Path(ckpt) if ckpt else resolve_checkpoint("text", None, SHIPPED, HOW_TO_TRAIN)


def load_model(ckpt: str | Path) -> MambaLMHeadModel:
    """Any byte-level checkpoint: hiss save_pretrained, mamba_ssm (e.g. MambaByte), HF, or a Lightning .ckpt of
    TextLMModule; in eval mode. A model of another vocabulary is refused by name."""
    return common_load_model(ckpt, lightning_module=TextLMModule, vocab_range=(256, 259), what="byte-level model")


def save_cartridge(path: str | Path, model, document: bytes | str, bos: bool = False, chunk_len: int = 8192
                   ) -> ModelState:
    """Prefill a whole document once and save its state (ssm_core.save_state: safetensors + config).
    Continue later with ``load_cartridge`` and at least one more byte of prompt."""
    state = prefill(model, encode(document, bos=bos), chunk_len=chunk_len)
    save_state(path, state, model.config)
    return state


def load_cartridge(path: str | Path, model) -> ModelState:
    """A state saved by save_cartridge; a cartridge from a different model is a ValueError naming both."""
    return load_state(path, model.config)


def stream_bytes(model, prompt: bytes | str, max_new_bytes: int = 200, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 0.0, seed: int | None = None, state: ModelState | None = None, bos: bool = False,
                 stop_at_eos: bool = True, draft=None, k: int = 4, stats: SpecStats | None = None
                 ) -> Iterator[int]:
    """Generated token ids one at a time (ints; < 256 are bytes). ``state`` continues a cartridge, then the
    prompt must hold at least one byte. ``draft``: a small byte model for speculative decoding."""
    ids = encode(prompt, bos=bos and state is None).unsqueeze(0)
    if ids.shape[1] == 0:
        raise ValueError("generate: the prompt is empty" + (" (after a state cartridge, type at least one more "
                                                             "character to continue from)" if state else ""))
    vocab = min(model.config.vocab_size, 259)
    eos = EOS if stop_at_eos and vocab > EOS else None
    spec = {"draft": draft, "k": k, "stats": stats} if draft is not None else {}
    for tok in model.stream(ids, max_new_bytes, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            state=state, vocab_size=vocab, eos_token_id=eos, **spec):
        t = int(tok[0])
        if t == EOS and eos is not None:
            return
        yield t


def stream_text(model, prompt: bytes | str, max_new_bytes: int = 200, **kwargs) -> Iterator[str]:
    """Generated text in pieces, each a run of whole characters (see Utf8Stream); kwargs as stream_bytes."""
    dec = Utf8Stream()
    for t in stream_bytes(model, prompt, max_new_bytes, **kwargs):
        piece = dec.feed([t])
        if piece:
            yield piece
    tail = dec.flush()
    if tail:
        yield tail


def byte_surprisal(model, data: bytes, state: ModelState | None = None, bos: bool = False) -> list[float]:
    """Surprisal in bits of each byte given all before it (len(data) values; the first byte is nan unless a
    state or BOS gives it context). Exact for any length (chunked, state carried)."""
    ids = encode(data, bos=bos)
    if len(ids) == 0:
        return []
    vocab = min(model.config.vocab_size, 259)
    nll = sequence_nll(model, ids, vocab_size=vocab, state=state)
    # the first byte's prediction came from logits before it that no one kept (a cartridge stores the state
    # only); with BOS the first id is BOS itself, not a byte
    return ([] if bos else [math.nan]) + (nll / math.log(2)).tolist()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint directory (hiss, mamba_ssm/MambaByte or HF); default: "
                   "runs/text/pretrained, else the shipped apps/text/assets/byte_mamba")
    p.add_argument("--prompt", default="", help="prompt text (escapes like \\n are decoded)")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from a file (bytes)")
    p.add_argument("--max-bytes", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int)
    p.add_argument("--state", type=Path, help="continue from this state cartridge")
    p.add_argument("--save-state", type=Path, help="prefill the prompt, save its state cartridge and stop")
    p.add_argument("--draft", help="draft checkpoint for speculative decoding")
    p.add_argument("--k", type=int, default=4, help="drafted bytes per speculative round")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.max_bytes < 0:
        raise ValueError(f"--max-bytes must be >= 0, got {a.max_bytes}")
    torch.set_num_threads(a.threads)
    model = load_model(default_model(a.ckpt))
    bos = model.config.vocab_size > BOS
    # surrogateescape: a --prompt with invalid UTF-8 bytes (decoded by Python with surrogateescape) is those bytes
    prompt = a.prompt_file.read_bytes() if a.prompt_file else a.prompt.replace("\\n", "\n").replace(
        "\\t", "\t").encode("utf-8", "surrogateescape")
    if a.save_state:
        state = save_cartridge(a.save_state, model, prompt, bos=bos)
        print(f"{a.save_state}: state after {state.seqlen_offset:,} bytes ({state.nbytes:,} bytes on disk)")
        return
    state = load_cartridge(a.state, model) if a.state else None
    draft = load_model(a.draft) if a.draft else None
    stats = SpecStats()
    t0, n = time.perf_counter(), 0
    dec = Utf8Stream()
    for t in stream_bytes(model, prompt, a.max_bytes, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                          seed=a.seed, state=state, bos=bos, draft=draft, k=a.k, stats=stats):
        n += 1
        sys.stdout.write(dec.feed([t]))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    dt = time.perf_counter() - t0
    extra = f", acceptance {stats.acceptance_rate:.2f}" if draft is not None else ""
    print(f"[{n} bytes in {dt:.2f} s: {n / dt:.1f} bytes/s{extra}]", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
