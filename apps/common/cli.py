"""One LightningCLI entry point for every app: ``python -m apps.<app>.train [fit|validate|test] [options]``.

With no subcommand, ``fit`` is implied, so ``python -m apps.genomics.train`` and
``python -m apps.genomics.train --trainer.max_steps=20`` both train; the app's default YAML config is
read first and ``--config FILE`` / ``--section.key=value`` override it (LightningCLI conventions).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pytorch_lightning.cli import LightningCLI

from .callbacks import RemoveEmptyRunOnFailure
from .checkpoint import check_checkpoint_fits

__all__ = ["cli_main"]

SUBCOMMANDS = ("fit", "validate", "test", "predict")
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


class _AppCLI(LightningCLI):
    """LightningCLI that checks ``--ckpt_path`` before anything is built: a missing, corrupt or foreign checkpoint
    is one clear line (Lightning would otherwise apply another app's hyperparameters, or fail deep inside)."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and not (str(ckpt) in LIGHTNING_CKPT_NAMES and not Path(ckpt).exists()):
            check_checkpoint_fits(ckpt, self.model_class, self.datamodule_class)


def cli_main(model_class, datamodule_class, default_config: str | Path, args: list[str] | None = None,
             **cli_kwargs) -> LightningCLI:
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["fit", *argv]
    defaults = {"default_config_files": [str(default_config)]}
    cli_kwargs.setdefault("save_config_kwargs", {"overwrite": True})
    trainer_defaults = dict(cli_kwargs.pop("trainer_defaults", None) or {})
    trainer_defaults.setdefault("callbacks", []).append(RemoveEmptyRunOnFailure())  # appended to the config's
    cli_kwargs["trainer_defaults"] = trainer_defaults
    cli_kwargs.setdefault("seed_everything_default", 0)
    parser_kwargs = {sub: dict(defaults) for sub in SUBCOMMANDS}
    if args is not None:
        return _AppCLI(model_class, datamodule_class, args=argv, parser_kwargs=parser_kwargs, **cli_kwargs)
    # from the command line: hand LightningCLI sys.argv itself (args= plus argv would warn on every run)
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        return _AppCLI(model_class, datamodule_class, parser_kwargs=parser_kwargs, **cli_kwargs)
    finally:
        sys.argv = saved
