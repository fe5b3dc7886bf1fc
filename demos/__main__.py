"""python -m demos [genomics|text|audio|vision|all] [--port N] [--ckpt DIR] [--debug]: one app's demo or all as tabs."""

from __future__ import annotations

import argparse

import torch

from apps.common.demo import launch
from apps.common.errors import run_cli

from . import APPS, build, build_all


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m demos", description=__doc__)
    p.add_argument("app", nargs="?", default="all", choices=[*APPS, "all"])
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--ckpt", help="checkpoint directory for the chosen app (not with 'all')")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    if a.ckpt and a.app == "all":
        p.error("--ckpt names one app's checkpoint: use it with an app name, not 'all'")
    torch.set_num_threads(a.threads)
    launch(build_all() if a.app == "all" else build(a.app, a.ckpt), port=a.port)


if __name__ == "__main__":
    run_cli(main)
