"""Thin wrapper: `python scripts/bench_model.py [overrides] [--models ...] ...` == `dyconv-bench model ...`."""

import sys

from dyconv_repro.analysis.bench_model import main

if __name__ == "__main__":
    main(sys.argv[1:])
