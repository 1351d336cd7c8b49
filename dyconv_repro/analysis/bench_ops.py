"""Operator micro-benchmark: every registered op against the static conv of the same shape.

One process, one thread setting, same inputs. For each layer shape and regime the *floor* is the
faster of nn.Conv2d in NCHW and in channels_last measured in the same run; every op is timed in both
memory formats too and its faster one is reported as `op time / floor`. Regimes: forward at batch 1
(inference, eval + no_grad), forward at the training batch, forward+backward at the training batch
(train mode, gradients w.r.t. the input and all trainable parameters).

Also timed: each op's `reparameterize()`d deploy form (refconv/structured must be the plain conv,
1.0x), timm's CondConv2d (8 experts, sigmoid router) and MixedConv2d (3,5,7) as peers, and a static
depthwise 7x7 conv (MixConv's target is <= 1.5x of it).
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.benchmark import Timer

from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError


@dataclass(frozen=True)
class LayerShape:
    name: str
    role: str  # pw | dense | dw
    cin: int
    cout: int
    k: int
    hw: int
    stride: int = 1

    @property
    def groups(self) -> int:
        return self.cin if self.role == "dw" else 1


# Representative MobileNetV2 / ResNet-18 layers, 14^2 .. 56^2 maps.
SHAPES = [
    LayerShape("mbv2 expand 1x1 24->144 @56", "pw", 24, 144, 1, 56),
    LayerShape("mbv2 dw 3x3 144 @56", "dw", 144, 144, 3, 56),
    LayerShape("mbv2 project 1x1 384->64 @14", "pw", 384, 64, 1, 14),
    LayerShape("mbv2 dw 3x3 576 @14", "dw", 576, 576, 3, 14),
    LayerShape("r18 3x3 64->64 @56", "dense", 64, 64, 3, 56),
    LayerShape("r18 3x3 256->256 @14", "dense", 256, 256, 3, 14),
]
QUICK_SHAPES = [SHAPES[0], SHAPES[3], SHAPES[2], SHAPES[5]]

# Ops that only make sense on some roles (MixConv replaces depthwise convs; RefConv leaves 1x1 alone).
APPLIES = {"mixconv": ("dw",), "refconv": ("dw", "dense"), "timm.MixedConv2d": ("dw",), "conv.dw7x7": ("dw",)}
REGIMES = (("fwd", "b1"), ("fwd", "bN"), ("fwd+bwd", "bN"))


class TimmCondConvPeer(nn.Module):
    """timm's CondConv2d with the CondConv router (sigmoid(FC(GAP(x)))), as a single-tensor layer."""

    def __init__(self, cin, cout, k, stride, groups, num_experts=8):
        super().__init__()
        from timm.layers import CondConv2d

        self.router = nn.Linear(cin, num_experts)
        self.conv = CondConv2d(cin, cout, k, stride=stride, padding="", groups=groups, num_experts=num_experts)

    def forward(self, x):
        return self.conv(x, torch.sigmoid(self.router(x.mean((2, 3)))))


def op_kwargs(name: str) -> dict:
    """The op's default kwargs from configs/op/<name>.yaml (empty if it has no config file)."""
    f = Path(config_dir()) / "op" / f"{name}.yaml"
    if not f.is_file():
        return {}
    return dict(OmegaConf.to_container(OmegaConf.load(f)).get("kwargs") or {})


def candidates(ops: list[str] | None = None) -> list[tuple[str, Callable[[LayerShape], nn.Module]]]:
    """(label, factory) of everything timed besides the floor."""
    from timm.layers import MixedConv2d

    from dyconv_repro.ops import OPS, build_op

    names = OPS.names() if not ops else ops
    unknown = [n for n in names if n not in OPS]
    if unknown:
        raise UserError(f"unknown op(s) {unknown}; valid: {', '.join(OPS.names())}")
    out = []
    for name in names:
        kw = op_kwargs(name)

        def make(s, name=name, kw=kw):
            return build_op(name, s.cin, s.cout, s.k, stride=s.stride, groups=s.groups, **kw)

        out.append((name, make))
        if callable(getattr(OPS.get(name), "reparameterize", None)):
            out.append((f"{name}[deploy]", lambda s, make=make: make(s).reparameterize()))
    out.append(("timm.CondConv2d", lambda s: TimmCondConvPeer(s.cin, s.cout, s.k, s.stride, s.groups)))
    out.append(("timm.MixedConv2d", lambda s: MixedConv2d(s.cin, s.cout, [3, 5, 7], stride=s.stride,
                                                          depthwise=True)))
    out.append(("conv.dw7x7", lambda s: nn.Conv2d(s.cin, s.cout, 7, s.stride, 3, groups=s.groups, bias=False)))
    return out


def _fmt(fmt: str):
    return torch.channels_last if fmt == "cl" else torch.contiguous_format


def make_fn(m: nn.Module, regime: str, fmt: str, device, x: torch.Tensor, g: torch.Tensor | None):
    """The timed statement: eval + no_grad forward, or train-mode forward + grads of input and params."""
    mf = _fmt(fmt)
    # only 4-D tensors have a channels_last layout (routers, expert banks etc. stay as they are)
    m = m.to(device)._apply(lambda t: t.contiguous(memory_format=mf) if t.dim() == 4 else t)
    if regime == "fwd":
        m.eval()

        def fn():
            with torch.no_grad():
                return m(x)
    else:
        m.train()
        params = [p for p in m.parameters() if p.requires_grad]

        def fn():
            return torch.autograd.grad(m(x), [x, *params], g)

    return fn


class _Job:
    """One timed statement: warmed up and calibrated so that one block lasts >= min_block_s."""

    def __init__(self, fn, threads: int, min_block_s: float):
        fn()
        fn()
        self.timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
        once = self.timer.timeit(1).median
        self.number = max(1, math.ceil(min_block_s / max(once, 1e-7)))
        self.times: list[float] = []

    def block(self) -> None:
        self.times.append(self.timer.timeit(self.number).median)


def run(device: str = "cpu", threads: int = 2, repeats: int = 5, batch: int = 64, shapes=None, ops=None,
        formats=("nchw", "cl"), min_block_s: float = 0.05, progress: bool = True) -> list[dict]:
    """Time everything; one row per (regime, shape, label) with the best format's median time and ratio.

    All statements of one (shape, regime) are timed round-robin (repeat r of every op, then repeat
    r+1, ...), so a load spike from other processes hits the floor and the ops alike.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    shapes = shapes or SHAPES
    cands = candidates(ops)
    rows = []
    for s in shapes:
        for regime, bkey in REGIMES:
            b = 1 if bkey == "b1" else batch
            base = {"device": device, "regime": regime, "batch": b, "shape": s.name, "role": s.role}
            inputs = {}
            for f in formats:
                x = torch.randn(b, s.cin, s.hw, s.hw, device=dev).to(memory_format=_fmt(f))
                conv = nn.Conv2d(s.cin, s.cout, s.k, s.stride, s.k // 2, groups=s.groups, bias=False).to(dev)
                g = None
                if regime != "fwd":
                    x.requires_grad_(True)
                    with torch.no_grad():
                        g = torch.randn_like(conv(x))
                inputs[f] = (x, g)
            jobs: dict[tuple[str, str], _Job] = {}
            errors: dict[str, str] = {}
            entries = [("floor.conv", lambda s: nn.Conv2d(s.cin, s.cout, s.k, s.stride, s.k // 2,
                                                          groups=s.groups, bias=False))] + cands
            for label, make in entries:
                if s.role not in APPLIES.get(label.split("[")[0], (s.role,)):
                    continue
                for f in formats:
                    torch.manual_seed(0)
                    try:  # an op that refuses this shape (or breaks) is reported, not fatal
                        jobs[label, f] = _Job(make_fn(make(s), regime, f, dev, *inputs[f]), threads, min_block_s)
                    except Exception as e:  # noqa: BLE001
                        msg = str(e).splitlines()[0] if str(e) else ""
                        errors[label] = f"{type(e).__name__}: {msg}"
                        break
            for _ in range(repeats):
                for job in jobs.values():
                    job.block()
            med = {k: statistics.median(j.times) for k, j in jobs.items()}
            floor = min(med["floor.conv", f] for f in formats)
            for f in formats:
                rows.append({**base, "label": f"floor.conv[{f}]", "format": f, "time_s": med["floor.conv", f],
                             "min_s": min(jobs["floor.conv", f].times), "floor_s": floor,
                             "ratio": med["floor.conv", f] / floor})
            for label, _ in cands:
                if label in errors:
                    rows.append({**base, "label": label, "format": "-", "time_s": float("nan"),
                                 "floor_s": floor, "ratio": float("nan"), "note": errors[label]})
                    continue
                got = [f for f in formats if (label, f) in jobs]
                if not got:
                    continue
                best = min(got, key=lambda f: med[label, f])
                rows.append({**base, "label": label, "format": best, "time_s": med[label, best],
                             "min_s": min(jobs[label, best].times), "floor_s": floor,
                             "ratio": med[label, best] / floor})
            del jobs, inputs
            if progress:
                print(f"  done {s.name} {regime} b{b} (floor {floor * 1e3:.2f} ms)", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    """Table of median (worst) ratios per label and regime, plus floors and MixConv vs dw7x7."""
    lines = []
    for device in dict.fromkeys(r["device"] for r in rows):
        rs = [r for r in rows if r["device"] == device]
        cols = list(dict.fromkeys((r["regime"], r["batch"]) for r in rs))
        labels = list(dict.fromkeys(r["label"] for r in rs))
        head = f"{'op (time / floor)':<22}" + "".join(f"{f'{g} b{b}':>22}" for g, b in cols)
        lines += [f"device={device}  ratio = op / min(conv NCHW, conv channels_last); median (worst) over shapes",
                  head, "-" * len(head)]
        for label in labels:
            cells = []
            for g, b in cols:
                v = [r["ratio"] for r in rs if r["label"] == label and (r["regime"], r["batch"]) == (g, b)]
                ok = [x for x in v if not math.isnan(x)]
                if not v:
                    cells.append("")
                elif not ok:
                    cells.append("n/a")
                else:
                    cells.append(f"{statistics.median(ok):.2f}x ({max(ok):.2f}x) n={len(ok)}")
            lines.append(f"{label:<22}" + "".join(f"{c:>22}" for c in cells))
        lines.append("")
        lines.append("floor per shape (ms): " + ", ".join(f"{g} b{b}" for g, b in cols))
        for shape in dict.fromkeys(r["shape"] for r in rs):
            fl = [next((r["floor_s"] for r in rs if r["shape"] == shape and (r["regime"], r["batch"]) == c),
                       float("nan")) for c in cols]
            lines.append(f"  {shape:<32}" + "".join(f"{f * 1e3:>12.3f}" for f in fl))
        mix = [(r, next((q for q in rs if q["label"] == "conv.dw7x7" and q["shape"] == r["shape"]
                         and q["regime"] == r["regime"] and q["batch"] == r["batch"]), None))
               for r in rs if r["label"] == "mixconv" and not math.isnan(r["ratio"])]
        if mix:
            lines.append("mixconv / static depthwise 7x7 (target <= 1.5x for fwd+bwd):")
            for r, q in mix:
                if q is not None:
                    lines.append(f"  {r['shape']:<32} {r['regime']:>8} b{r['batch']:<3} "
                                 f"{r['time_s'] / q['time_s']:.2f}x")
        notes = {(r["label"], r["note"]) for r in rs if r.get("note")}
        for label, note in sorted(notes):
            lines.append(f"note: {label} skipped on some shapes: {note}")
        lines.append("")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str) -> None:
    keys = ["device", "regime", "batch", "shape", "role", "label", "format", "time_s", "min_s", "floor_s", "ratio",
            "note"]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
