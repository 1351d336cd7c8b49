"""`dyconv-bench <subcommand>`: speed benchmarks. `ops`: every operator vs the static conv floor; `model`: whole networks vs the static model."""

from __future__ import annotations

import argparse

import torch

from dyconv_repro.analysis.bench_model import add_model_parser
from dyconv_repro.cli.common import user_errors_exit
from dyconv_repro.errors import UserError


def add_ops_parser(sub) -> None:
    p = sub.add_parser("ops", help="time every registered op against the static conv of the same shape")
    p.add_argument("--device", default="all", choices=("cpu", "cuda", "all"),
                   help="all = CPU, plus CUDA when present (default)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per measurement (default 5; quick 3)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 64; quick 16)")
    p.add_argument("--quick", action="store_true", help="4 shapes, 3 repeats, batch 16: a fast smoke run")
    p.add_argument("--ops", nargs="+", default=None, help="only these registered ops (default: all)")
    p.add_argument("--formats", nargs="+", default=["nchw", "cl"], choices=("nchw", "cl"),
                   help="memory formats tried for every op and for the floor (default both)")
    p.add_argument("--csv", default=None, help="write every measurement to this CSV file")
    p.set_defaults(func=_run_ops)


def _run_ops(args) -> None:
    from dyconv_repro.analysis import bench_ops

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    devices = ["cpu", "cuda"] if args.device == "all" and torch.cuda.is_available() else (
        ["cpu"] if args.device == "all" else [args.device])
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    repeats = args.repeats or (3 if args.quick else 5)
    batch = args.batch or (16 if args.quick else 64)
    shapes = bench_ops.QUICK_SHAPES if args.quick else bench_ops.SHAPES
    rows = []
    for dev in devices:
        print(f"benchmarking on {dev} (threads={args.threads}, batch 1 and {batch}, repeats={repeats}, "
              f"torch {torch.__version__})", flush=True)
        rows += bench_ops.run(dev, args.threads, repeats, batch, shapes, args.ops, tuple(args.formats),
                              min_block_s=0.02 if args.quick else 0.05)
    print()
    print(bench_ops.summarize(rows))
    if args.csv:
        bench_ops.write_csv(rows, args.csv)
        print(f"wrote {args.csv}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dyconv-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_ops_parser(sub)
    add_model_parser(sub)
    return parser


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
