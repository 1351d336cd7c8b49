"""Time the dynamic ops' conv paths against the static floor (the evidence behind the CPU rules, dyconv_repro/ops/cpu/rules.py).

    .venv/bin/python scripts/time_dynamic_paths.py [--batch 64] [--reps 3] [--ops dynamicconv,condconv]
        [--paths auto,fold,loop,stream] [--layers pw,dw,dense,cifar] [--forward-only] [--threads 2] [--clock wall|cpu]

Floor = the faster of nn.Conv2d in NCHW and channels_last; each op is timed with both input formats.
Backward uses a dense random output gradient (as in training). Timings interleave the candidates and keep the minimum of `reps` (the CPU is shared, noise is one-sided).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from dyconv_repro.ops import build_op

LAYERS = {  # name: (C_in, C_out, k, groups, H)
    "pw_exp56": (24, 144, 1, 1, 56), "pw_exp28": (32, 192, 1, 1, 28), "pw_exp14": (96, 576, 1, 1, 14),
    "pw_prj56": (144, 24, 1, 1, 56), "pw_prj28": (192, 32, 1, 1, 28), "pw_prj14": (576, 96, 1, 1, 14),
    "dense56": (64, 64, 3, 1, 56), "dense28": (128, 128, 3, 1, 28), "dense14": (256, 256, 3, 1, 14), "dense7": (512, 512, 3, 1, 7),
    "dw56": (144, 144, 3, 144, 56), "dw28": (192, 192, 3, 192, 28), "dw14": (576, 576, 3, 576, 14),
    # CIFAR ResNet-20 (narrow convs on small maps: the per-sample conv is tiny)
    "cifar32": (16, 16, 3, 1, 32), "cifar16": (32, 32, 3, 1, 16), "cifar8": (64, 64, 3, 1, 8),
}


def _step(mod, x, backward, grad=None):
    """One forward (+ backward with a dense random output gradient, as in training)."""
    def run():
        if backward:
            x.grad = None
            mod.zero_grad(set_to_none=True)
            mod(x).backward(grad)
        else:
            with torch.no_grad():
                mod(x)
    return run


def _time(cands: dict, reps: int, clock) -> dict:
    for f in cands.values():
        f()
    out = {k: float("inf") for k in cands}
    for _ in range(reps):
        for k, f in cands.items():
            t0 = clock()
            f()
            out[k] = min(out[k], clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ops", default="dynamicconv,condconv,weightnet")
    ap.add_argument("--paths", default="auto")
    ap.add_argument("--layers", default="pw,dw,dense")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = process CPU time: robust to other jobs on a shared machine (use with --threads 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    backward = not args.forward_only
    ratios: dict[str, list[float]] = {}
    for lname, (ci, co, k, g, h) in LAYERS.items():
        if not any(lname.startswith(p) for p in args.layers.split(",")):
            continue
        x = torch.randn(args.batch, ci, h, h, requires_grad=backward)
        xcl = x.detach().to(memory_format=torch.channels_last).requires_grad_(backward)
        static = nn.Conv2d(ci, co, k, padding=k // 2, groups=g, bias=False)
        with torch.no_grad():
            grad = torch.randn_like(static(x))
        cands = {"static_nchw": _step(static, x, backward, grad), "static_cl": _step(static, xcl, backward, grad)}
        for op_name in args.ops.split(","):
            op = build_op(op_name, ci, co, k, groups=g)
            for path in args.paths.split(","):
                if path == "matmul" and k != 1:
                    continue
                op.path = path
                # bind the path at call time so each candidate keeps its own
                for fmt, xx in (("nchw", x), ("cl", xcl)):
                    def run(op=op, path=path, xx=xx, grad=grad):
                        op.path = path
                        _step(op, xx, backward, grad)()
                    cands[f"{op_name}/{path}/{fmt}"] = run
        t = _time(cands, args.reps, time.perf_counter if args.clock == "wall" else time.process_time)
        floor = min(t["static_nchw"], t["static_cl"])
        row = [f"{lname:9s} floor {floor * 1e3:7.1f}ms (nchw {t['static_nchw'] * 1e3:.1f} cl {t['static_cl'] * 1e3:.1f})"]
        for key in cands:
            if key.startswith("static"):
                continue
            row.append(f"{key}={t[key] / floor:.2f}")
        for op_name in args.ops.split(","):
            for path in args.paths.split(","):
                base = f"{op_name}/{path}"
                vals = [t[k] for k in t if k.startswith(base + "/")]
                if vals:
                    ratios.setdefault(base, []).append(min(vals) / floor)
        print("  ".join(row), flush=True)
    print("\nratio to floor (best input format per layer):")
    for base, vals in ratios.items():
        print(f"  {base:28s} median {statistics.median(vals):.2f}  worst {max(vals):.2f}  "
              + " ".join(f"{v:.2f}" for v in vals))


if __name__ == "__main__":
    main()
