"""Gradio demo: generate speech-like audio (any digit or a chosen one), or continue an uploaded / recorded clip;
audio player, waveform and spectrogram, progress while generating.

    python -m apps.audio.demo [--ckpt DIR] [--port 7860]      # http://127.0.0.1:7860 (local only)

``build_demo(ckpt)`` returns the Blocks (a tab of ``python -m demos``); the handlers live on ``AudioDemo`` so
tests call them without a server. Without ``--ckpt`` it uses $HISS_AUDIO_CKPT, then runs/audio/pretrained
(``python -m apps.audio.train``), then the small model shipped in apps/audio/assets/digits_small.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from apps.audio.data import DIGITS, AudioError, is_silent, mu_law_encode, read_audio, write_audio
from apps.audio.evaluate import load_audio_model
from apps.audio.generate import DEFAULT_CKPT, generate
from apps.common.demo import demo_main, find_checkpoint, gr, message_demo
from apps.common.errors import run_cli

__all__ = ["AudioDemo", "build_demo", "default_checkpoints", "plot_audio", "main"]

REPO = Path(__file__).resolve().parents[2]
MAX_SECONDS = 4.0  # new audio per request: about 4 s of CPU per second of audio at worst
MAX_PROMPT_SECONDS = 10.0
HOW_TO_TRAIN = "Train one with `python -m apps.audio.train` (about 10 minutes on CPU) or pass `--ckpt DIR`."
ANY = "any (unconditional)"


def default_checkpoints() -> list[Path]:
    env = os.environ.get("HISS_AUDIO_CKPT")
    return ([Path(env)] if env else []) + [REPO / "runs" / "audio" / "pretrained", DEFAULT_CKPT]


def plot_audio(wav, sample_rate: int, title: str = ""):
    """A matplotlib figure: the waveform above its log-magnitude spectrogram (STFT, 512-point Hann window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    wav = torch.as_tensor(wav).float().flatten()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True, constrained_layout=True)
    t = torch.arange(len(wav)) / sample_rate
    ax1.plot(t.numpy(), wav.numpy(), linewidth=0.5)
    ax1.set_ylim(-1.05, 1.05)
    ax1.set_ylabel("amplitude")
    ax1.set_title(title)
    if len(wav) >= 512:
        spec = torch.stft(wav, 512, hop_length=128, window=torch.hann_window(512), return_complex=True).abs()
        db = 20 * torch.log10(spec + 1e-5)
        ax2.imshow(db.numpy(), origin="lower", aspect="auto", cmap="magma", vmin=float(db.max()) - 80,
                   extent=[0, len(wav) / sample_rate, 0, sample_rate / 2000])
    ax2.set_ylabel("kHz")
    ax2.set_xlabel("seconds")
    return fig


class AudioDemo:
    """The demo's model and handlers (plain Python: tests call them directly)."""

    def __init__(self, ckpt: str | Path):
        self.ckpt = Path(ckpt)
        self.model = load_audio_model(ckpt)
        self.rate = self.model.config.sample_rate
        self.workdir = Path(tempfile.mkdtemp(prefix="hiss_audio_demo_"))

    @property
    def conditional(self) -> bool:
        return self.model.cond is not None

    def _run(self, seconds, digit, prompt_tokens, temperature, top_p, seed, progress, what):
        seconds = float(seconds)
        if not 0 < seconds <= MAX_SECONDS:
            raise gr.Error(f"length must be between 0 and {MAX_SECONDS:g} s")
        label = None
        if digit and digit != ANY:
            if not self.conditional:
                raise gr.Error("this model is unconditional: it cannot be asked for a digit")
            label = DIGITS.index(digit)
        seed = None if seed is None or seed == "" else int(seed)
        t0 = time.perf_counter()

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress(done / total, desc=f"generating: {done:,} / {total:,} samples")

        wav = generate(self.model, 1, seconds, label, prompt_tokens, float(temperature), 0, float(top_p), seed,
                       progress=report)[0]
        dt = time.perf_counter() - t0
        new = int(round(seconds * self.rate))
        path = write_audio(self.workdir / f"{what}_{int(time.time() * 1000)}.wav", wav, self.rate)
        status = (f"{new:,} new samples in {dt:.1f} s ({new / max(dt, 1e-9):,.0f} samples/s, "
                  f"{new / max(dt, 1e-9) / self.rate:.2f}x real time)")
        title = what + (f" '{digit}'" if label is not None else "")
        return str(path), plot_audio(wav, self.rate, title), status

    def generate(self, digit: str = ANY, seconds: float = 1.0, temperature: float = 1.0, top_p: float = 0.0,
                 seed: int | None = 0, progress=None):
        """Returns (wav file path, figure, status)."""
        return self._run(seconds, digit, None, temperature, top_p, seed, progress, "generated")

    def continue_clip(self, audio_path: str | None, seconds: float = 1.0, digit: str = ANY,
                      temperature: float = 1.0, top_p: float = 0.0, seed: int | None = 0, progress=None):
        """Continue an uploaded or recorded clip; returns (wav path: the clip then its continuation, figure,
        status). Bad uploads are refused with the reason."""
        if not audio_path:
            raise gr.Error("upload or record a clip to continue")
        try:
            wav = read_audio(audio_path, self.rate)
        except (AudioError, FileNotFoundError) as e:
            raise gr.Error(f"cannot use this file: {e}") from e
        if len(wav) > MAX_PROMPT_SECONDS * self.rate:
            raise gr.Error(f"the clip is {len(wav) / self.rate:.1f} s; this demo continues clips of at most "
                           f"{MAX_PROMPT_SECONDS:g} s")
        if is_silent(wav):
            raise gr.Error("the clip is silent (nothing above -60 dBFS): nothing to continue")
        return self._run(seconds, digit, mu_law_encode(wav), temperature, top_p, seed, progress, "continued")


def build_demo(ckpt: str | Path | None = None) -> gr.Blocks:
    """The audio demo; with no usable checkpoint, a page that says how to make one."""
    try:
        path = find_checkpoint([ckpt] if ckpt else default_checkpoints(), HOW_TO_TRAIN)
        app = AudioDemo(path)
    except (FileNotFoundError, ValueError) as e:
        return message_demo("Audio (waveform U-Net)", f"**No audio model available.** {e}")
    n_params = sum(p.numel() for p in app.model.parameters())
    choices = [ANY, *DIGITS] if app.conditional else [ANY]
    with gr.Blocks(title="hiss: audio") as demo:
        gr.Markdown(f"### Waveform Mamba U-Net\nCheckpoint `{path}`: {n_params:,} parameters, 8-bit µ-law at "
                    f"{app.rate:,} Hz, one sample per step on the CPU"
                    + (", conditioned on a spoken digit if you pick one." if app.conditional else "."))
        with gr.Row():
            with gr.Column():
                digit = gr.Dropdown(choices, value=ANY, label="Digit", elem_id="audio-digit")
                seconds = gr.Slider(0.1, MAX_SECONDS, value=1.0, step=0.1, label="Seconds of new audio")
                with gr.Row():
                    temperature = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="Temperature (0: greedy)")
                    top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Top-p (0 or 1: off)")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                run = gr.Button("Generate", variant="primary", elem_id="audio-generate")
                prompt = gr.Audio(sources=["upload", "microphone"], type="filepath",
                                  label=f"Clip to continue (at most {MAX_PROMPT_SECONDS:g} s)", elem_id="audio-prompt")
                cont = gr.Button("Continue the clip", elem_id="audio-continue")
            with gr.Column():
                status = gr.Markdown(elem_id="audio-status")
                player = gr.Audio(label="Result", type="filepath", interactive=False, elem_id="audio-output")
                plot = gr.Plot(label="Waveform and spectrogram", elem_id="audio-plot")

        def on_generate(d, s, t, p, sd, progress=gr.Progress()):  # noqa: B008 - how Gradio injects progress
            return app.generate(d, s, t, p, sd, progress)

        def on_continue(a, s, d, t, p, sd, progress=gr.Progress()):  # noqa: B008
            return app.continue_clip(a, s, d, t, p, sd, progress)

        run.click(on_generate, [digit, seconds, temperature, top_p, seed], [player, plot, status])
        cont.click(on_continue, [prompt, seconds, digit, temperature, top_p, seed], [player, plot, status])
    return demo


def main(argv: list[str] | None = None) -> None:
    demo_main(build_demo, argv, __doc__, ckpt_help="exported model folder (default: see above)")


if __name__ == "__main__":
    run_cli(main)
