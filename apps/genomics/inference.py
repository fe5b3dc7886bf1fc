"""Renamed: ``python -m apps.genomics.predict`` (this alias keeps the old command working)."""

from apps.common.errors import run_cli
from apps.genomics.predict import *  # noqa: F401,F403
from apps.genomics.predict import main

if __name__ == "__main__":
    run_cli(main)
