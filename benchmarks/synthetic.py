"""Moved: the synthetic-task reproduction is ``python -m experiments.synthetic`` (benchmarks/ holds speed
benchmarks only). This alias keeps the old command working; same subcommands and flags."""

import sys

from experiments.synthetic.__main__ import main

if __name__ == "__main__":
    print("benchmarks.synthetic moved: running `python -m experiments.synthetic`", file=sys.stderr)
    main()
