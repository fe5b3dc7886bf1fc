"""Train a causal DNA language model (LightningCLI; configs/default.yaml is read first).

    python -m apps.genomics.train                                  # small Mamba, bundled E. coli, CPU, minutes
    python -m apps.genomics.train --trainer.max_steps=20           # any option as --section.key=value
    python -m apps.genomics.train --config apps/genomics/configs/long_1m.yaml   # L = 2^20, exact gradients
    python -m apps.genomics.train --ckpt_path runs/genomics/version_0/checkpoints/last.ckpt   # resume
    python -m apps.genomics.train --trainer.accumulate_grad_batches=4 --trainer.strategy=ddp --trainer.devices=2

Writes Lightning checkpoints and CSV logs under runs/genomics/, the save_pretrained model to
runs/genomics/pretrained (apps.common.ExportPretrained), then prints the exact held-out bits/base of the test
split (apps.genomics.evaluate.HeldOutBitsPerBase).
"""

from __future__ import annotations

from pathlib import Path

from apps.common.cli import cli_main
from apps.common.errors import run_cli
from apps.genomics.data import DNADataModule
from apps.genomics.model import DNALM

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main(args: list[str] | None = None):
    return cli_main(DNALM, DNADataModule, DEFAULT_CONFIG, args=args)


if __name__ == "__main__":
    run_cli(main)
