"""What the exportable form costs: each dynamic op's inference time in its export form (`export_mode()`, what an
ONNX / torch.export graph computes: unfold + batched matmul) and in its normal eager path, at batch 1 and 64,
as ratios against the static nn.Conv2d of the same shape timed in the same process (eval, no_grad, CPU, NCHW).

    python scripts/bench_export_path.py [--threads 2] [--min-run-time 0.3] [--out results/benchmarks/export_path.md]

The export form is timed in eager PyTorch (its aten cost) and, with --onnxruntime, as what a deployment runs:
the layer exported by the dynamo ONNX exporter with a dynamic batch and run in onnxruntime (CPU, same threads),
against the static conv exported and run the same way.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from torch.utils.benchmark import Timer

from dyconv_repro.analysis.bench_ops import op_kwargs
from dyconv_repro.ops import build_op
from dyconv_repro.ops.cpu import native
from dyconv_repro.ops.engine.dispatch import export_mode

DYNAMIC_OPS = ("condconv", "dynamicconv", "dynet", "weightnet")
# (label, C_in, C_out, k, H=W, groups): CIFAR ResNet-20 and MobileNetV2 / ResNet-18 layers at small maps (the
# export form's unfold holds k*k copies of the input: 56^2 maps at batch 64 do not fit a laptop's memory)
SHAPES = [("r20 3x3 16->16 @32", 16, 16, 3, 32, 1), ("r20 3x3 64->64 @8", 64, 64, 3, 8, 1),
          ("r18 3x3 256->256 @14", 256, 256, 3, 14, 1), ("mbv2 dw 3x3 576 @14", 576, 576, 3, 14, 576),
          ("mbv2 project 1x1 384->64 @14", 384, 64, 1, 14, 1)]
BATCHES = (1, 64)


def seconds(fn, x, min_run_time: float) -> float:
    with torch.no_grad():
        fn(x)
        return Timer("fn(x)", globals={"fn": fn, "x": x}).blocked_autorange(min_run_time=min_run_time).median


def ort_session(module, shape, threads: int, tmp):
    """An onnxruntime session of `module` exported with a dynamic batch (from a batch-2 example of `shape`)."""
    import onnxruntime

    from dyconv_repro.models.export import export_onnx

    path = export_onnx(module, torch.randn(2, *shape), Path(tmp) / f"layer{id(module)}.onnx")
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return onnxruntime.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_seconds(session, x, min_run_time: float) -> float:
    """Median onnxruntime time of one run at input x."""
    import time

    feed = {session.get_inputs()[0].name: x.numpy()}
    session.run(None, feed)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < min_run_time or len(times) < 5:
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def in_export_form(op):
    def run(x):
        with export_mode():
            return op(x)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=0.3)
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--onnxruntime", action="store_true", help="also time each layer's ONNX file in onnxruntime")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    tmp = tempfile.mkdtemp()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for label, cin, cout, k, hw, groups in SHAPES:
        conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False).eval()
        ops = {}
        for name in DYNAMIC_OPS:
            try:
                ops[name] = build_op(name, cin, cout, k, padding=k // 2, groups=groups, **op_kwargs(name)).eval()
            except Exception as e:  # noqa: BLE001 - an op that does not take this shape: say so in the table
                print(f"{name} on {label}: {e}", file=sys.stderr)
        sessions = {}
        if args.onnxruntime:
            sessions = {name: ort_session(m, (cin, hw, hw), args.threads, tmp)
                        for name, m in {"conv": conv, **ops}.items()}
        for b in BATCHES:
            x = torch.randn(b, cin, hw, hw)
            floor = seconds(conv, x, args.min_run_time)
            ort_floor = ort_seconds(sessions["conv"], x, args.min_run_time) if sessions else None
            for name, op in ops.items():
                normal = seconds(op, x, args.min_run_time)
                export = seconds(in_export_form(op), x, args.min_run_time)
                ort = ort_seconds(sessions[name], x, args.min_run_time) / ort_floor if sessions else None
                rows.append((label, b, name, floor, normal / floor, export / floor, export / normal, ort_floor, ort))
                print(f"{label:30s} b{b:<3d} {name:12s} conv {floor * 1e3:8.3f} ms  normal {normal / floor:6.2f}x  "
                      f"export {export / floor:6.2f}x  export/normal {export / normal:5.2f}"
                      + (f"  onnxruntime {ort:5.2f}x" if ort else ""), flush=True)
    lines = ["| layer | batch | op | static conv (ms) | normal path / conv | export form / conv | export / normal "
             "| onnxruntime: conv file (ms) | onnxruntime: op file / conv file |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {lab} | {b} | {name} | {floor * 1e3:.3f} | {n:.2f}x | {e:.2f}x | {r:.2f} | "
              f"{f'{of * 1e3:.3f}' if of else '-'} | {f'{o:.2f}x' if o else '-'} |"
              for lab, b, name, floor, n, e, r, of, o in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        header = (f"<!-- written by: python scripts/bench_export_path.py --threads {args.threads} "
                  f"--min-run-time {args.min_run_time}{' --onnxruntime' if args.onnxruntime else ''} "
                  f"--out {args.out} -->\n"
                  f"Measured {stamp}; torch {torch.__version__}; {platform.processor() or platform.machine()}, "
                  f"{args.threads} threads; native kernels: {native.status()}.\n\n")
        with open(args.out, "w") as f:
            f.write(header + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
