"""Train a byte-level Mamba (MambaByte):  python -m apps.text.train [fit|validate|test] [options]

With no arguments: a 0.5M-parameter Mamba on the bundled Python-docs sample (datasets/samples/python_docs),
CPU, about 4 minutes; progress bar, Lightning checkpoint, save_pretrained export and exact held-out
bits/byte under runs/text/. Options follow LightningCLI (``--config FILE``, ``--trainer.max_time=00:00:10:00``,
``--data.paths='[data/pydocs]'``, ``--model.chunk_len=256``, ``--data.tbptt=true``); defaults:
apps/text/configs/default.yaml.
"""

from __future__ import annotations

from pathlib import Path

from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.text.data import ByteDataModule
from apps.text.model import TextLMModule

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def main(args: list[str] | None = None):
    return cli_main(TextLMModule, ByteDataModule, DEFAULT_CONFIG, args)


if __name__ == "__main__":
    run_cli(main)
