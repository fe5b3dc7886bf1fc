"""Train a causal DNA language model (LightningCLI; configs/default.yaml is read first).

    python -m apps.genomics.train                                  # small Mamba, bundled E. coli, CPU, minutes
    python -m apps.genomics.train --trainer.max_steps=20           # any option as --section.key=value
    python -m apps.genomics.train --config apps/genomics/configs/long_1m.yaml   # L = 2^20, exact gradients
    python -m apps.genomics.train --ckpt_path runs/genomics/version_0/checkpoints/last.ckpt   # resume
    python -m apps.genomics.train --trainer.accumulate_grad_batches=4 --trainer.strategy=ddp --trainer.devices=2

Writes Lightning checkpoints and CSV logs under runs/genomics/, the save_pretrained model to
runs/genomics/pretrained (ExportPretrained), then prints the exact held-out bits/base of the test split.
"""

from __future__ import annotations

from pathlib import Path

from apps.common.cli import cli_main
from apps.genomics.data import DNADataModule
from apps.genomics.evaluate import bits_per_base
from apps.genomics.model import DNALM

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "default.yaml"


def main(args: list[str] | None = None):
    cli = cli_main(DNALM, DNADataModule, DEFAULT_CONFIG, args=args)
    trainer, dm = cli.trainer, cli.datamodule
    if cli.subcommand == "fit" and trainer.is_global_zero and not trainer.interrupted:
        dm.setup()
        test = dm.split("test")
        # pieces of the training length: the result is the same for any piece length (state / KV cache
        # carried), the memory of an attention baseline is not
        chunk = max(dm.hparams.seq_len, cli.model.hparams.chunk_len or 0)
        bits, n = bits_per_base(cli.model.model, dm.fasta, test, chunk_len=chunk,
                                progress=trainer.progress_bar_callback is not None)
        print(f"held-out bits/base (test split, {n:,} bases, whole intervals, exact chunked evaluation): "
              f"{bits:.4f}")
        cli.held_out_bits_per_base = bits
    return cli


if __name__ == "__main__":
    main()
