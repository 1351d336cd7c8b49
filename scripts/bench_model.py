"""Thin wrapper: `python scripts/bench_model.py [overrides] [--models ...] ...` == `dyconv-bench model ...`."""

import sys

from dyconv_repro.cli.bench import main

if __name__ == "__main__":
    main(["model", *sys.argv[1:]])
