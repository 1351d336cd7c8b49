"""Thin wrapper: `python scripts/bench_ops.py [--quick] ...` == `dyconv-bench ops ...`."""

import sys

from dyconv_repro.cli.bench import main

if __name__ == "__main__":
    main(["ops", *sys.argv[1:]])
