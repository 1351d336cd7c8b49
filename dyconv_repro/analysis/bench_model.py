"""Model-level benchmark (`dyconv-bench model`): whole networks against the static model, in one process.

Why this exists: the papers sell "more capacity at almost the same MAdds"; the number users feel is
wall-clock. For every backbone the static model (op=conv) and each operator's model are built from the
composed Hydra config (`build_model`), kept in memory together and measured *interleaved* -- round r
times every model once per metric, the order reversed every other round -- so load from other
processes hits all of them alike; the figure is the median over rounds, and every figure is also given
as a ratio to the static model of the same backbone from the same run.

Metrics (after warm-up): training throughput (images/s of forward + cross-entropy + backward + SGD
step), inference latency at batch 1 and throughput at a large batch (eval, inference_mode), and the
peak memory of one training step / one large-batch inference:

* CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated just before
  it (so the models held for the other rows do not count).
* CPU: peak RSS delta -- gc + ``malloc_trim(0)`` (free heap pages back to the OS), reset the kernel's
  high-water mark (``echo 5 > /proc/self/clear_refs``), read VmRSS, run the call, read VmHWM; the
  figure is VmHWM - VmRSS(before). It counts activations, gradients, the per-sample kernels and
  allocator slack, not the weights / optimizer state already resident. NaN where /proc is unavailable.
  Heap fragmentation makes single readings noisy (+-20-30%), so it is read in every round and the
  median is reported.

On CPU the run keeps freed memory in the heap between calls (``--cpu-heap keep``, what the trainer does on
CPU; engine/cpu_heap.py), so no model pays for faulting its transient tensors in anew each step; the memory
figures are unaffected (``malloc_trim(0)`` returns that memory before each reading). ``--cpu-heap default``
measures with the allocator as it is.

Re-parameterizable operators (those where `reparameterize_model` or `decompose_model` changes the
model) also get `<op>[deploy]` / `<op>[decomposed]` rows (inference only). `peers=True` adds timm's
`efficientnet_cc_b0_4e` against our CondConv EfficientNet-B0 and timm's `mixnet_s` against our
MobileNetV2 with MixConv.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dyconv_repro.engine import cpu_heap
from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine.dispatch import backend_status

CIFAR_BACKBONES = ("resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
DEFAULT_MODELS = "mobilenet_v2,resnet18,resnet20"
# K=4 for CondConv: the issue-7 targets are stated for K=4 (the config default is the paper's 8)
DEFAULT_OPS = "conv,dynamicconv,condconv:num_experts=4,weightnet,refconv,structured"
METRICS = ("train", "b1", "bN")
# (column, higher is better) -- the ratio of a "lower is better" figure is op / static as well
FIGURES = (("train_ips", True), ("b1_ms", False), ("bN_ips", True), ("train_peak_mb", False),
           ("infer_peak_mb", False))

# issue 7's targets, checked on the rows present: (label prefix, column, comparison, bound)
TARGETS = (
    ("dynamicconv", "train_ips_ratio", ">=", 0.70),
    ("condconv", "train_ips_ratio", ">=", 0.70),
    ("weightnet", "train_ips_ratio", ">=", 0.65),
    ("dynamicconv", "b1_ms_ratio", "<=", 1.30),
    ("condconv", "b1_ms_ratio", "<=", 1.30),
    ("weightnet", "b1_ms_ratio", "<=", 1.30),
)
TARGET_BACKBONES = ("mobilenet_v2", "resnet18", "resnet20")  # the backbones issue 7 names
# deployed forms that must run at the static model's speed (1.00x +- noise, or faster)
PARITY_OPS = ("refconv", "structured")


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    """One model of a group: its Hydra overrides and how it is labelled."""

    group: str
    label: str
    overrides: list[str]
    image_size: int
    num_classes: int
    kind: str = "op"  # static | op | peer | deploy | decomposed
    source: str | None = None  # deploy/decomposed rows: label of the training-form case
    model: nn.Module | None = field(default=None, repr=False)


def split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside [...] brackets (so `kernel_sizes=[3,5,7]` stays one token)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == sep and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [t.strip() for t in out if t.strip()]


def parse_token(token: str, group_key: str) -> tuple[str, list[str], int | None]:
    """`name[@size][:key=val[:key=val]]` -> (name, Hydra overrides, image size or None).

    A plain key goes to `<group_key>.kwargs.<key>` for ops and `model.<key>` for models; a key with
    a dot or a config-group name (`policy`) is passed through as a full override.
    """
    parts = split_top(token, ":")
    head, size = parts[0], None
    if "@" in head:
        head, s = head.split("@", 1)
        if not s.isdigit():
            raise UserError(f"bad image size in {token!r}: write name@SIZE, e.g. resnet20@32")
        size = int(s)
    overrides = [f"{group_key}={head}"]
    for kv in parts[1:]:
        if "=" not in kv:
            raise UserError(f"bad option {kv!r} in {token!r}: write name:key=value (e.g. condconv:num_experts=4)")
        key, val = kv.split("=", 1)
        if "." in key or key in ("policy", "data", "recipe"):
            overrides.append(f"{key}={val}")
        elif group_key == "op":
            overrides.append(f"op.kwargs.{key}={val}")
        else:
            overrides.append(f"model.{key}={val}")
    return head, overrides, size


def default_image_size(backbone: str) -> int:
    return 32 if backbone in CIFAR_BACKBONES else 224


def default_num_classes(image_size: int) -> int:
    return 10 if image_size <= 64 else 1000


def _static_overrides(overrides: list[str]) -> list[str]:
    """The same config with the operator removed: drop op / policy overrides, set op=conv."""
    keep = [o for o in overrides if not re.match(r"^[+~]*(op|policy)(\.|=)", o)]
    return [*keep, "op=conv"]


def plan_cases(models: str | None, ops: str | None, overrides: list[str], image_size: int | None,
               num_classes: int | None, peers: bool) -> list[Case]:
    """The ordered cases; every group starts with its static model."""
    cases: list[Case] = []

    def add_group(name, base, size, op_tokens):
        size = size or image_size or default_image_size(name)
        ncls = num_classes or default_num_classes(size)
        group = f"{name}@{size}"
        labels = {c.label for c in cases if c.group == group}
        if "conv" not in labels:
            cases.append(Case(group, "conv", [*base, "op=conv"], size, ncls, kind="static"))
        for tok in op_tokens:
            op, ov, _ = parse_token(tok, "op")
            if op == "conv" and len(ov) == 1:
                continue
            if tok not in {c.label for c in cases if c.group == group}:
                cases.append(Case(group, tok, [*base, *ov], size, ncls))
        return group, size, ncls

    if models:
        op_tokens = split_top(ops or DEFAULT_OPS)
        for tok in split_top(models):
            name, mov, size = parse_token(tok, "model")
            add_group(name, [*mov, *overrides], size, op_tokens)
    elif overrides or not peers:
        if ops:
            raise UserError("--ops needs --models (or give one config as overrides: model=X op=Y)")
        model = next((o.split("=", 1)[1] for o in overrides if o.startswith("model=")), "resnet20")
        size = image_size or default_image_size(model)
        ncls = num_classes or default_num_classes(size)
        group = f"{model}@{size}"
        cases.append(Case(group, "conv", _static_overrides(overrides), size, ncls, kind="static"))
        op = next((o.split("=", 1)[1] for o in overrides if o.startswith("op=")), "conv")
        rest = [o for o in overrides if o.startswith(("op.", "policy"))]
        label = op + "".join(f":{o.removeprefix('op.kwargs.')}" for o in rest)
        if op != "conv" or rest:
            cases.append(Case(group, label, list(overrides), size, ncls))
    if peers:
        size = image_size if image_size and image_size > 64 else 224
        group, _, ncls = add_group("efficientnet_b0", ["model=efficientnet_b0"], size,
                                   ["condconv:num_experts=4:policy=condconv_effnet"])
        cases.append(Case(group, "timm:efficientnet_cc_b0_4e", ["model=efficientnet_cc_b0_4e", "op=conv"],
                          size, ncls, kind="peer"))
        group, _, ncls = add_group("mobilenet_v2", ["model=mobilenet_v2"], size, ["mixconv"])
        cases.append(Case(group, "timm:mixnet_s", ["model=mixnet_s", "op=conv"], size, ncls, kind="peer"))
    return _by_group(cases)


def _by_group(cases: list[Case]) -> list[Case]:
    order = list(dict.fromkeys(c.group for c in cases))
    return [c for g in order for c in cases if c.group == g]


# peers: (our label, peer label) compared directly in the summary
PEER_PAIRS = (("condconv:num_experts=4:policy=condconv_effnet", "timm:efficientnet_cc_b0_4e"),
              ("mixconv", "timm:mixnet_s"))


def build_case(case: Case) -> nn.Module:
    from dyconv_repro.config import compose
    from dyconv_repro.models.build import build_model_with_report

    cfg = compose(["data=fake", f"data.image_size={case.image_size}", f"data.num_classes={case.num_classes}",
                   *case.overrides])
    return build_model_with_report(cfg, verbose=False)[0]


def deploy_variants(case: Case) -> list[Case]:
    """`[deploy]` (reparameterize_model) and `[decomposed]` (the deploy tool's decompose=auto: the structured
    layers where the SumPool pays on CPU decomposed, the others plain convs) rows where they change the model."""
    from dyconv_repro.models.deploy import deploy_transform
    from dyconv_repro.ops.walkers import iter_capable, reparameterize_model

    out = []
    for kind, attr, fn in (("deploy", "reparameterize", reparameterize_model),
                           ("decomposed", "decompose", lambda m: deploy_transform(m, "auto"))):
        if next(iter_capable(case.model, attr), None) is None:
            continue
        out.append(Case(case.group, f"{case.label}[{kind}]", case.overrides, case.image_size, case.num_classes,
                        kind=kind, source=case.label, model=fn(case.model)))
    return out


# ----------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+)\s*kB", f.read(), re.M)
    if not m:
        raise OSError(f"{key} not in /proc/self/status")
    return int(m.group(1))


def peak_memory_mb(fn, device: torch.device) -> float:
    """Peak extra memory (MiB) of one call of `fn` (see the module docstring for what is measured)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        cpu_heap.release()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = _status_kb("VmRSS")
        fn()
        return max(0, _status_kb("VmHWM") - before) / 1024
    except OSError:
        fn()
        return float("nan")


# ----------------------------------------------------------------------------- runner
@dataclass
class Settings:
    device: str = "cpu"
    amp: str | None = None  # None | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    threads: int = 2
    cpu_heap: str = "keep"  # engine/cpu_heap.py: keep | default
    repeats: int = 5
    warmup: int = 2
    train_batch: int = 32
    infer_batch: int = 32
    min_block_s: float = 0.2
    lr: float = 0.01


class Runner:
    """The callables timed for one case: a training step and the two inference regimes."""

    def __init__(self, case: Case, s: Settings):
        self.case, self.s = case, s
        dev = torch.device(s.device)
        self.device = dev
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        # only 4-D tensors have a channels_last layout (expert banks / routers stay as they are)
        model = case.model.to(dev)._apply(lambda t: t.contiguous(memory_format=fmt) if t.dim() == 4 else t)
        self.model = model
        self.fwd = torch.compile(model) if s.compile else model
        self.amp = (torch.autocast(dev.type, dtype=torch.bfloat16 if s.amp == "bf16" else torch.float16)
                    if s.amp else None)
        size = case.image_size
        g = torch.Generator().manual_seed(0)

        def images(b):
            return torch.randn(b, 3, size, size, generator=g).to(dev).contiguous(memory_format=fmt)

        self.x1, self.xN = images(1), images(s.infer_batch)
        self.can_train = case.kind not in ("deploy", "decomposed")
        if self.can_train:
            self.xT = images(s.train_batch)
            self.yT = torch.randint(0, case.num_classes, (s.train_batch,), generator=g).to(dev)
            params = [p for p in model.parameters() if p.requires_grad]
            self.opt = torch.optim.SGD(params, lr=s.lr, momentum=0.9)
            self.scaler = torch.amp.GradScaler(dev.type) if s.amp == "fp16" else None
        self.number: dict[str, int] = {}
        self.times: dict[str, list[float]] = {m: [] for m in METRICS}
        self.peaks: dict[str, list[float]] = {"train": [], "bN": []}

    def _ctx(self):
        return self.amp if self.amp is not None else nullcontext()

    def train_step(self):
        self.model.train()
        with self._ctx():
            loss = nn.functional.cross_entropy(self.fwd(self.xT), self.yT)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)  # grads freed here, so a step's memory delta includes them
        return loss

    def _infer(self, x):
        self.model.eval()
        with torch.inference_mode(), self._ctx():
            return self.fwd(x)

    def call(self, metric: str):
        if metric == "train":
            return self.train_step()
        return self._infer(self.x1 if metric == "b1" else self.xN)

    def metrics(self) -> tuple[str, ...]:
        return METRICS if self.can_train else ("b1", "bN")

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def block(self, metric: str, number: int) -> float:
        """Seconds per call over `number` back-to-back calls; batch-1 latency: the median call of the block.

        A batch-1 call is a few ms, so one preemption of this VM's vCPU (tens of ms) moved a block's
        mean by 2-3x between rounds; the median call is the latency a user sees, robust to those spikes.
        """
        if metric == "b1":
            times = []
            for _ in range(number):
                self._sync()
                t0 = time.perf_counter()
                self.call(metric)
                self._sync()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)
        self._sync()
        t0 = time.perf_counter()
        for _ in range(number):
            self.call(metric)
        self._sync()
        return (time.perf_counter() - t0) / number

    def warm_up(self, metric: str) -> None:
        """`warmup` untimed calls; the last one also measures peak memory and sizes the timed blocks.

        One call both ways, because a training step of a 224-px network takes seconds on 2 CPU threads.
        """
        for _ in range(max(0, self.s.warmup - 1)):
            self.call(metric)
        once = []

        def timed():
            once.append(self.block(metric, 1))

        if metric in self.peaks:
            self.peaks[metric].append(peak_memory_mb(timed, self.device))
        else:
            timed()
        self.number[metric] = max(1, math.ceil(self.s.min_block_s / max(once[0], 1e-6)))

    def measure(self, metric: str) -> None:
        """One timed block; training steps and large-batch inference also record their peak memory
        (gc / malloc_trim / high-water reset happen outside the timed region)."""
        if metric not in self.peaks:
            self.times[metric].append(self.block(metric, self.number[metric]))
            return

        def timed():
            self.times[metric].append(self.block(metric, self.number[metric]))

        self.peaks[metric].append(peak_memory_mb(timed, self.device))


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_cases(cases: list[Case], s: Settings, progress=print) -> tuple[list[dict], dict]:
    """Measure every case (built here, group by group, interleaved within a group); returns (rows, load info)."""
    from dyconv_repro.analysis.complexity import count_madds, count_params

    torch.set_num_threads(s.threads)
    if s.device == "cpu":
        cpu_heap.configure(s.cpu_heap)
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    loads = [_load()]
    rows: list[dict] = []
    for group in dict.fromkeys(c.group for c in cases):
        members: list[Case] = []
        for c in (c for c in cases if c.group == group):
            torch.manual_seed(0)
            c.model = build_case(c)
            members.append(c)
            if c.kind in ("op", "static"):
                members += deploy_variants(c)
        info = {}
        for c in members:
            info[c.label] = {"params": count_params(c.model), "madds": count_madds(c.model, c.image_size)}
        runners = [Runner(c, s) for c in members]
        progress(f"[{group}] {len(runners)} models: {', '.join(c.label for c in members)}")
        for r in runners:
            for m in r.metrics():
                r.warm_up(m)
        progress(f"[{group}] warmed up; {s.repeats} interleaved rounds")
        for rnd in range(s.repeats):
            order = runners if rnd % 2 == 0 else runners[::-1]
            for m in METRICS:
                for r in order:
                    if m in r.metrics():
                        r.measure(m)
            loads.append(_load())
            progress(f"[{group}] round {rnd + 1}/{s.repeats} done (load {loads[-1]:.2f})")
        rows += _group_rows(group, runners, info, s)
        for c in members:
            c.model = None
        del runners
        gc.collect()
    return rows, {"load_start": loads[0], "load_end": loads[-1], "load_max": max(loads)}


def _spread(ts: list[float]) -> float:
    return (max(ts) - min(ts)) / statistics.median(ts) if ts else float("nan")


def _group_rows(group: str, runners: list[Runner], info: dict, s: Settings) -> list[dict]:
    rows = []
    for r in runners:
        c, t = r.case, r.times
        med = {m: statistics.median(v) if v else float("nan") for m, v in t.items()}
        rows.append({
            "group": group, "label": c.label, "kind": c.kind, "image_size": c.image_size,
            "num_classes": c.num_classes, "overrides": " ".join(c.overrides),
            "params": info[c.label]["params"], "madds": info[c.label]["madds"],
            "train_ips": s.train_batch / med["train"] if t["train"] else float("nan"),
            "train_step_ms": med["train"] * 1e3,
            "b1_ms": med["b1"] * 1e3,
            "bN_ips": s.infer_batch / med["bN"],
            "train_peak_mb": statistics.median(r.peaks["train"]) if r.peaks["train"] else float("nan"),
            "infer_peak_mb": statistics.median(r.peaks["bN"]) if r.peaks["bN"] else float("nan"),
            "train_spread": _spread(t["train"]), "b1_spread": _spread(t["b1"]), "bN_spread": _spread(t["bN"]),
            "repeats": len(t["b1"]),
        })
    static = next(x for x in rows if x["kind"] == "static")
    for x in rows:
        x["madds_ratio"] = x["madds"] / static["madds"]
        for col, _ in FIGURES:
            x[f"{col}_ratio"] = x[col] / static[col] if static[col] else float("nan")
    return rows


# ----------------------------------------------------------------------------- reporting
CSV_KEYS = ("group", "label", "kind", "image_size", "num_classes", "params", "madds", "madds_ratio",
            "train_ips", "train_ips_ratio", "train_step_ms", "b1_ms", "b1_ms_ratio", "bN_ips", "bN_ips_ratio",
            "train_peak_mb", "train_peak_mb_ratio", "infer_peak_mb", "infer_peak_mb_ratio",
            "train_spread", "b1_spread", "bN_spread", "repeats", "overrides")


def _fmt(v, ratio=None, digits=1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.{digits}f}"
    if ratio is not None and not math.isnan(ratio):
        s += f" ({ratio:.2f}x)"
    return s


def table(rows: list[dict], meta: dict, markdown: bool = False) -> str:
    """The result table: absolute figures with the ratio to the group's static model in brackets."""
    head = ["model", "op", "params M", "MAdds M (x)", f"train img/s b{meta['train_batch']} (x)",
            "b1 latency ms (x)", f"infer img/s b{meta['infer_batch']} (x)", "train peak MB (x)",
            "infer peak MB (x)"]
    body = []
    for r in rows:
        body.append([r["group"], r["label"], f"{r['params'] / 1e6:.2f}", _fmt(r["madds"] / 1e6, r["madds_ratio"], 0),
                     _fmt(r["train_ips"], r["train_ips_ratio"]), _fmt(r["b1_ms"], r["b1_ms_ratio"], 2),
                     _fmt(r["bN_ips"], r["bN_ips_ratio"]), _fmt(r["train_peak_mb"], r["train_peak_mb_ratio"], 0),
                     _fmt(r["infer_peak_mb"], r["infer_peak_mb_ratio"], 0)])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*head), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    return "\n".join(out + [fmt.format(*b) for b in body])


def _noise(rows: list[dict], group: str, col: str) -> float:
    """Relative noise of a figure in a group: half the static model's (max-min)/median over rounds, >= 5%."""
    static = next(r for r in rows if r["group"] == group and r["kind"] == "static")
    sp = static.get({"b1_ms": "b1_spread", "bN_ips": "bN_spread"}.get(col, "train_spread"), float("nan"))
    return max(0.05, sp / 2 if not math.isnan(sp) else 0.0)


def check_targets(rows: list[dict]) -> list[dict]:
    """Issue 7's targets on the rows present: one entry per (row, target) with the verdict."""
    out = []
    for r in rows:
        base = r["label"].split(":")[0].split("[")[0]
        for prefix, col, cmp, bound in TARGETS:
            if (r["kind"] == "op" and base == prefix and r["group"].split("@")[0] in TARGET_BACKBONES
                    and not math.isnan(r[col])):
                ok = r[col] >= bound if cmp == ">=" else r[col] <= bound
                out.append({"group": r["group"], "label": r["label"], "figure": col, "value": r[col],
                            "target": f"{cmp} {bound:.2f}", "met": bool(ok)})
        if base in PARITY_OPS and r["kind"] in ("deploy", "decomposed"):
            for col in ("b1_ms_ratio", "bN_ips_ratio"):
                tol = _noise(rows, r["group"], col.removesuffix("_ratio"))
                ok = abs(r[col] - 1.0) <= tol or (col == "b1_ms_ratio" and r[col] < 1.0) or (
                    col == "bN_ips_ratio" and r[col] > 1.0)
                out.append({"group": r["group"], "label": r["label"], "figure": col, "value": r[col],
                            "target": f"1.00 +- {tol:.2f} (or faster)", "met": bool(ok)})
    for ours, peer in PEER_PAIRS:
        for group in dict.fromkeys(r["group"] for r in rows):
            a = next((r for r in rows if r["group"] == group and r["label"] == ours), None)
            b = next((r for r in rows if r["group"] == group and r["label"] == peer), None)
            if a is None or b is None or not ours.startswith("condconv"):
                continue
            for col, higher in (("train_ips", True), ("b1_ms", False)):
                v = a[col] / b[col]
                out.append({"group": group, "label": f"{ours} / {peer}", "figure": col, "value": v,
                            "target": ">= 1.00" if higher else "<= 1.00", "met": bool(v >= 1 if higher else v <= 1)})
    return out


def peer_lines(rows: list[dict]) -> list[str]:
    lines = []
    for ours, peer in PEER_PAIRS:
        for group in dict.fromkeys(r["group"] for r in rows):
            a = next((r for r in rows if r["group"] == group and r["label"] == ours), None)
            b = next((r for r in rows if r["group"] == group and r["label"] == peer), None)
            if a and b:
                lines.append(f"{group}: ours {ours} / {peer}: train img/s {a['train_ips'] / b['train_ips']:.2f}x, "
                             f"b1 latency {a['b1_ms'] / b['b1_ms']:.2f}x, infer img/s "
                             f"{a['bN_ips'] / b['bN_ips']:.2f}x (params {a['params'] / 1e6:.2f}M vs "
                             f"{b['params'] / 1e6:.2f}M, MAdds {a['madds'] / 1e6:.0f}M vs {b['madds'] / 1e6:.0f}M)")
    return lines


def target_lines(checks: list[dict]) -> list[str]:
    return [f"{'MET ' if c['met'] else 'MISS'} {c['group']:<18} {c['label']:<46} {c['figure']:<14} "
            f"{c['value']:.2f} (target {c['target']})" for c in checks]


def hardware() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1).strip() if m else platform.processor() or "unknown"
    except OSError:
        cpu = platform.processor() or "unknown"
    hw = {"cpu": cpu, "logical_cpus": os.cpu_count(),
          "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
          "native_batch_one": backend_status("cpu")}
    try:
        import timm

        hw["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name()
    return hw


def command_line(argv: list[str] | None) -> str:
    if argv is not None:
        return "dyconv-bench model " + shlex.join(argv)
    prog = os.path.basename(sys.argv[0])
    if prog.endswith(".py"):
        return "python " + shlex.join([sys.argv[0], *sys.argv[1:]])
    return shlex.join([prog, *sys.argv[1:]])


def loaded(meta: dict) -> bool:
    """A shared / loaded machine: 1-min load above the number of CPUs at any point of the run."""
    return meta["load"]["load_max"] > (meta["hardware"]["cpus_available"] or 1) or bool(meta.get("shared"))


def write_outputs(rows: list[dict], meta: dict, checks: list[dict], stem: str) -> list[str]:
    """<stem>.csv (one row per model) and <stem>.json (meta + rows + target checks)."""
    p = Path(stem)
    if p.suffix in (".csv", ".json"):
        p = p.with_suffix("")
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_KEYS))
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_KEYS})
    p.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "targets": checks}, indent=1,
                                                 default=str) + "\n")
    return [str(p.with_suffix(".csv")), str(p.with_suffix(".json"))]


def page(rows: list[dict], meta: dict, checks: list[dict], name: str) -> str:
    """The generated results/benchmarks/<name>.md."""
    hw, ld = meta["hardware"], meta["load"]
    s = meta["settings"]
    when = ("on a SHARED / LOADED machine" if loaded(meta) else
            "with the load average never above the CPU count (this run included; other jobs may still cause the spread)")
    lines = [
        f"# Model benchmark: {name}",
        "",
        "<!-- generated by `dyconv-bench model --write-page`; do not edit by hand -->",
        "",
        f"Measured {meta['date']} {when}: 1-min load average {ld['load_start']:.2f} at the start, "
        f"{ld['load_end']:.2f} at the end, {ld['load_max']:.2f} at most, on {hw['cpus_available']} "
        f"available CPU(s)." + (" Other jobs were competing for the cores, so absolute figures are low and "
                               "noisy; the ratios are more trustworthy because every model of a group was "
                               "measured interleaved with its static model." if loaded(meta) else ""),
    ]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    lines += [
        "",
        "```",
        meta["command"],
        "```",
        "",
        f"- hardware: {hw['cpu']} ({hw['logical_cpus']} logical CPUs, {hw['cpus_available']} available)"
        + (f", GPU {hw['gpu']}" if hw.get("gpu") and s["device"].startswith("cuda") else ""),
        f"- software: torch {hw['torch']}, timm {hw.get('timm', '?')}, Python {hw['python']}, {hw['platform']}; "
        f"native kernels {hw.get('native_batch_one', 'not recorded')}",
        f"- device {s['device']}, threads {s['threads']}, amp {s['amp'] or 'off'}, channels_last "
        f"{s['channels_last']}, compile {s['compile']}"
        + (f"; CPU heap {s['cpu_heap_line']}" if s.get("cpu_heap_line") else ""),
        f"- training batch {s['train_batch']} (SGD momentum 0.9, cross-entropy), inference batch 1 and "
        f"{s['infer_batch']}; {s['warmup']} warm-up call(s), median of {s['repeats']} interleaved rounds, "
        f"each timed block >= {s['min_block_s']} s (batch-1 latency: the median call of each block)",
        "- ratio (x) = figure / the static model's (op=conv) of the same backbone in the same run; "
        "for latency and memory lower is better, for img/s higher is better",
        f"- peak memory: {'CUDA max_memory_allocated' if s['device'].startswith('cuda') else 'peak RSS delta (VmHWM after, reset via /proc/self/clear_refs, minus VmRSS before)'} "
        "of one training step / one inference at the large batch, above what was resident before the call; median over the warm-up call and every round",
        "- MAdds: batch-1 forward by FlopCounterMode (dyconv_repro.analysis.complexity)",
        "",
        table(rows, s, markdown=True),
        "",
    ]
    pl = peer_lines(rows)
    if pl:
        lines += ["## Peers", ""] + [f"- {x}" for x in pl] + [""]
    if checks:
        lines += ["## Issue 7 targets", "", "| model | row | figure | value | target | |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['group']} | {c['label']} | {c['figure']} | {c['value']:.2f} | {c['target']} | "
                  f"{'met' if c['met'] else '**missed**'} |" for c in checks]
        lines.append("")
    lines += ["Raw rows: " + f"`{name}.csv`, `{name}.json` (spread = (max-min)/median over rounds).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def configure_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="one config as Hydra overrides, e.g. model=mobilenet_v2 op=dynamicconv "
                   "(with --models: extra overrides applied to every model)")
    p.add_argument("--models", default=None,
                   help=f"comma list of backbones, each name[@SIZE][:key=val] (e.g. {DEFAULT_MODELS}); "
                        "a static model is always added per backbone")
    p.add_argument("--ops", default=None,
                   help=f"comma list of ops, each name[:key=val...] (default {DEFAULT_OPS}); "
                        "key=val sets op.kwargs.key, policy=X / a.b=c pass through")
    p.add_argument("--image-size", type=int, default=None,
                   help="input size for every model without @SIZE (default 32 for CIFAR ResNets, else 224)")
    p.add_argument("--num-classes", type=int, default=None, help="default 10 at <= 64 px, else 1000")
    p.add_argument("--peers", action="store_true",
                   help="add timm efficientnet_cc_b0_4e vs our CondConv EfficientNet-B0 (K=4) and timm mixnet_s "
                        "vs our MobileNetV2 + MixConv")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16"), help="autocast dtype (default off)")
    p.add_argument("--channels-last", action="store_true", help="channels_last models and inputs")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (compile time is warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--cpu-heap", default="keep", choices=cpu_heap.MODES,
                   help="keep: glibc keeps freed memory for the next step, as the trainer does on CPU (default); "
                        "default: the allocator as it is (see dyconv_repro/engine/cpu_heap.py)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5; --quick 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per model and metric, the last one also sizes the blocks and measures memory (default 2; quick 1)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 32 on CPU, 128 on CUDA)")
    p.add_argument("--infer-batch", type=int, default=None, help="large inference batch (default 32 CPU, 256 CUDA)")
    p.add_argument("--min-block", type=float, default=None,
                   help="seconds each timed block lasts at least (default 0.2; quick 0)")
    p.add_argument("--quick", action="store_true", help="1 round, 1 warm-up call, no block minimum (smoke runs)")
    p.add_argument("--out", default=None, help="write <out>.csv and <out>.json")
    p.add_argument("--write-page", nargs="?", const="", default=None, metavar="NAME",
                   help="(re)generate <page-dir>/NAME.md (+ .csv/.json); NAME defaults to <device>_<models>")
    p.add_argument("--page-dir", default="results/benchmarks", help="where --write-page writes")
    p.add_argument("--readme", action="store_true",
                   help="with --write-page: refresh README's benchmark summary from every page in --page-dir")
    p.add_argument("--shared", action="store_true",
                   help="state on the page that the machine was shared (also automatic when load > CPUs)")
    p.add_argument("--note", default=None, help="free text added to the page")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, print torch.profiler's top-N ops (self time) of one training step and one "
                        "batch-1 inference per model")


def add_model_parser(subparsers) -> argparse.ArgumentParser:
    """`dyconv-bench model ...` (for cli/bench.py's subparsers)."""
    from dyconv_repro.config import groups_help

    p = subparsers.add_parser("model", help="whole networks: training img/s, batch-1 latency, memory vs static",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=groups_help("dyconv-bench model", "dyconv-bench model [overrides ...] [options]"))
    configure_parser(p)
    p.set_defaults(func=run_model)
    return p


def settings_from(args) -> Settings:
    cuda = str(args.device).startswith("cuda")
    if args.threads < 1:
        raise UserError("--threads must be >= 1")
    for name in ("repeats", "warmup", "batch", "infer_batch"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if not (args.device == "cpu" or cuda):
        raise UserError(f"--device {args.device!r}: use cpu, cuda or cuda:N")
    return Settings(
        device=args.device, amp=args.amp, channels_last=args.channels_last, compile=args.compile,
        threads=args.threads, cpu_heap=args.cpu_heap, repeats=args.repeats or (1 if args.quick else 5),
        warmup=args.warmup if args.warmup is not None else (1 if args.quick else 2),
        train_batch=args.batch or (128 if cuda else 32), infer_batch=args.infer_batch or (256 if cuda else 32),
        min_block_s=args.min_block if args.min_block is not None else (0.0 if args.quick else 0.2))


def profile_cases(cases: list[Case], s: Settings, top: int) -> str:
    """torch.profiler top ops (by self time) of one training step and one batch-1 inference per model."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device.startswith("cuda") else [])
    sort = "self_cuda_time_total" if s.device.startswith("cuda") else "self_cpu_time_total"
    out = []
    for c in cases:
        torch.manual_seed(0)
        c.model = build_case(c)
        r = Runner(c, s)
        for m in ("train", "b1"):
            r.call(m)
            r.call(m)
            with profile(activities=acts) as prof:
                r.call(m)
            out.append(f"== {c.group} {c.label} {m} ==")
            out.append(prof.key_averages().table(sort_by=sort, row_limit=top))
        c.model = None
    return "\n".join(out)


def run_model(args) -> dict:
    """`dyconv-bench model`: plan, measure, print, write; returns {'rows', 'meta', 'targets'}."""
    s = settings_from(args)
    if args.readme and args.write_page is None:
        raise UserError("--readme needs --write-page (the summary is rendered from the pages)")
    cases = plan_cases(args.models, args.ops, list(args.overrides), args.image_size, args.num_classes, args.peers)
    print(f"benchmarking {len(cases)} models on {s.device} (threads={s.threads}, train batch {s.train_batch}, "
          f"infer batch 1/{s.infer_batch}, {s.repeats} rounds, torch {torch.__version__}, native kernels "
          f"{backend_status('cpu')}, load {_load():.2f})",
          flush=True)
    t0 = time.time()
    rows, load = run_cases(cases, s, progress=lambda m: print(m, flush=True))
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(getattr(args, "argv", None)), "hardware": hardware(), "load": load,
            "settings": {**vars(s), "cpu_heap_line": cpu_heap.describe(s.cpu_heap) if s.device == "cpu" else None},
            "wall_s": round(time.time() - t0, 1), "shared": bool(args.shared),
            "note": args.note, "train_batch": s.train_batch, "infer_batch": s.infer_batch}
    checks = check_targets(rows)
    print()
    print(table(rows, meta))
    for line in peer_lines(rows):
        print(line)
    if checks:
        print("\nissue 7 targets:")
        print("\n".join(target_lines(checks)))
    print(f"\nload average: start {load['load_start']:.2f}, end {load['load_end']:.2f}, max {load['load_max']:.2f} "
          f"({'shared/loaded machine' if loaded(meta) else 'quiet'}); wall {meta['wall_s']} s")
    if args.out:
        for f in write_outputs(rows, meta, checks, args.out):
            print(f"wrote {f}")
    if args.write_page is not None:
        name = args.write_page or f"{s.device.replace(':', '')}_" + "_".join(
            dict.fromkeys(g.replace("@", "_") for g in (r["group"] for r in rows)))
        d = Path(args.page_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_outputs(rows, meta, checks, str(d / name))
        (d / f"{name}.md").write_text(page(rows, meta, checks, name))
        print(f"wrote {d / name}.md (+ .csv, .json)")
        if args.readme:
            from dyconv_repro.analysis.bench_summary import SECTION, summary
            from dyconv_repro.results.readme import update_section

            print(f"updated {update_section(SECTION, summary(d))} ({SECTION})")
    if args.profile:
        print(profile_cases(cases, s, args.profile))
    return {"rows": rows, "meta": meta, "targets": checks}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyconv-bench model", description=__doc__.split("\n\n")[0])
    configure_parser(p)
    return p
