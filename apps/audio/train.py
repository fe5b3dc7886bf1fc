"""Train a waveform U-Net:  python -m apps.audio.train [fit|validate|test] [options]   (LightningCLI)

With no arguments: a small Mamba U-Net (455k parameters) on the espeak-ng spoken digits (generated into
~/.cache/hiss/audio/digits on first use), CPU, about 10 minutes; progress bar, Lightning checkpoints, the
exported model in runs/audio/pretrained, then the held-out NLL (unseen voices) in nats and bits per sample.
    python -m apps.audio.train --config apps/audio/configs/sc09_6m.yaml       # the Mamba paper's SC09 model
    python -m apps.audio.train --config apps/audio/configs/long_context.yaml  # 2^17-sample windows, chunked
    python -m apps.audio.train --data.source sc09 --data.root ~/data/sc09     # real SC09 / Speech Commands
    python -m apps.audio.train --model.config.blocks='[lti, lti, mamba]'      # Table 5 style ablations
"""

from __future__ import annotations

from pathlib import Path

from apps.audio.data import AudioDataModule
from apps.audio.model import AudioLM
from apps.common.cli import cli_main
from apps.common.errors import run_cli

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def main(args: list[str] | None = None):
    return cli_main(AudioLM, AudioDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    run_cli(main)
