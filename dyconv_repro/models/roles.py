"""Conv roles inferred from the module tree, the conv's shape and one traced forward pass.

Every conv (nn.Conv2d, an already swapped operator, or a library conv such as timm's CondConv2d)
gets a role and a stage so that a replacement policy can say "every depthwise conv of stages 4-6"
without naming modules:

- stem: the first conv applied to the image;
- head: the last conv, when it sits outside every block (MobileNet's 320->1280, ShuffleNet's conv5);
- depthwise: k>1 with groups == in_channels; pointwise: 1x1 (any groups); dense: any other kxk;
- classifier: the last nn.Linear; other linears get role `linear`;
- se: convs inside squeeze-and-excitation modules; internal: convs inside an operator (routing
  heads); unused: never called in the forward pass. These are reported but never replaced.

A *block* is the innermost proper ancestor holding >= 2 convs that is not a plain container
(nn.Sequential / ModuleList / ModuleDict): InvertedResidual, BasicBlock, Bottleneck, timm blocks.
The stage is the index of the model's stage container where it has one (timm `blocks.i` /
`stages.i`, ResNet `layerN`, ShuffleNet `stageN`); otherwise log2 of the downsampling factor at
the output of the conv's block (of the conv itself outside blocks). The stem is stage 0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from dyconv_repro.ops import OPS, ConvOp

CONV_ROLES = ("stem", "depthwise", "pointwise", "dense", "head")
ROLES = CONV_ROLES + ("classifier",)
_SE_CLASS = re.compile(r"SqueezeExcit|SEModule|SELayer|^SE$|EffectiveSE|EcaModule|CbamModule|GatherExcite")
_STAGE_PATTERNS = (re.compile(r"(?:^|\.)(?:blocks|stages)\.(\d+)(?:\.|$)"),
                   re.compile(r"(?:^|\.)(?:layer|stage)(\d+)(?:\.|$)"))
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


@dataclass
class LayerReport:
    """One conv / classifier of a model: what it is and what the surgery did with it."""

    name: str
    role: str
    stage: int | None
    shape: tuple  # (out, in/groups, kh, kw) for convs, (out, in) for linears
    kernel: tuple  # (kh, kw); () for linears
    stride: tuple = ()
    groups: int = 1
    replaced: bool = False
    op: str = "conv"
    note: str = ""
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def in_channels(self) -> int:
        return self.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.shape[0]


def op_name_of(module: nn.Module) -> str | None:
    """Registered operator name of `module` (None for plain nn.Conv2d / unknown modules)."""
    for name in OPS.names():
        cls = OPS.get(name)
        if type(module) is cls and name != "conv":
            return name
    if isinstance(module, ConvOp):
        return type(module).__name__
    return None


def _is_op(module: nn.Module) -> bool:
    if isinstance(module, ConvOp):
        return True
    return any(type(module) is OPS.get(n) for n in OPS.names() if n != "conv")


def _is_foreign_conv(module: nn.Module) -> bool:
    """A library conv that is not an nn.Conv2d (timm CondConv2d): reported, never replaced."""
    return (not isinstance(module, nn.Conv2d) and all(hasattr(module, a) for a in
            ("in_channels", "out_channels", "kernel_size")) and isinstance(getattr(module, "weight", None),
                                                                            torch.Tensor)
            and not any(isinstance(c, nn.Conv2d) for c in module.children()))


def _is_se(module: nn.Module) -> bool:
    return bool(_SE_CLASS.search(type(module).__name__))


def _conv_geometry(m: nn.Module) -> tuple[tuple, tuple, tuple, int]:
    k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size, m.kernel_size)
    s = getattr(m, "stride", 1)
    s = s if isinstance(s, tuple) else (s, s)
    g = int(getattr(m, "groups", 1))
    return (int(m.out_channels), int(m.in_channels) // g, int(k[0]), int(k[1])), tuple(k), tuple(s), g


def _trace(model: nn.Module, layers: dict[str, nn.Module], in_chans: int, sizes: list[int]):
    """Call order and output spatial size of each layer from one forward pass (None if none ran)."""
    for size in sizes:
        order: dict[str, tuple[int, tuple]] = {}
        handles = []
        for name, m in layers.items():
            def hook(mod, inp, out, name=name, order=order):
                if name not in order and isinstance(out, torch.Tensor):
                    order[name] = (len(order), tuple(out.shape[2:]))
            handles.append(m.register_forward_hook(hook))
        was_training = model.training
        try:
            model.eval()
            p = next(iter(model.parameters()), None)
            x = torch.zeros(1, in_chans, size, size, device=p.device if p is not None else None,
                            dtype=p.dtype if p is not None and p.is_floating_point() else None)
            with torch.no_grad():
                model(x)
            return order, size
        except Exception:  # noqa: BLE001 - e.g. a model that needs another input size; try the next
            continue
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return None, None


def infer_layers(model: nn.Module, image_size: int | None = None) -> list[LayerReport]:
    """Every conv-like layer and the classifier of `model`, in execution order, with roles and stages."""
    named = dict(model.named_modules())
    skip_under: list[str] = []  # prefixes whose convs are op-internal or SE
    convs: dict[str, nn.Module] = {}
    linears: dict[str, nn.Module] = {}
    internal: dict[str, str] = {}
    for name, m in named.items():
        if not name:
            continue
        parent_skip = next((p for p in skip_under if name.startswith(p + ".")), None)
        if parent_skip is not None:
            if isinstance(m, nn.Conv2d | nn.Linear):
                internal[name] = "se" if _is_se(named[parent_skip]) else "internal"
            continue
        if _is_op(m):
            convs[name] = m
            skip_under.append(name)
        elif _is_se(m):
            skip_under.append(name)
        elif isinstance(m, nn.Conv2d) or _is_foreign_conv(m):
            convs[name] = m
        elif isinstance(m, nn.Linear):
            linears[name] = m

    first = next(iter(convs.values()), None)
    in_chans = int(first.in_channels) if first is not None else 3
    size = int(image_size) if image_size else 64
    sizes = list(dict.fromkeys([min(size, 64), size, 224]))
    trace, traced_size = _trace(model, {**convs, **linears, **{n: named[n] for n in internal}}, in_chans, sizes)
    if trace is None:  # fall back to module order without resolution information
        trace = {n: (i, ()) for i, n in enumerate(list(convs) + list(linears) + list(internal))}
        traced_size = None

    def level(name: str) -> int | None:
        hw = trace.get(name, (0, ()))[1]
        if not hw or not traced_size:
            return None
        return max(0, round(math.log2(traced_size / max(1, hw[0]))))

    # blocks: innermost non-container ancestor with >= 2 convs
    counts: dict[str, int] = {}
    for name in convs:
        parts = name.split(".")
        for i in range(1, len(parts)):
            counts[".".join(parts[:i])] = counts.get(".".join(parts[:i]), 0) + 1

    def block_of(name: str) -> str | None:
        parts = name.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if counts.get(prefix, 0) >= 2 and type(named[prefix]) not in _CONTAINERS:
                return prefix
        return None

    blocks = {n: block_of(n) for n in convs}
    block_level: dict[str, int] = {}
    for n, b in blocks.items():
        lv = level(n)
        if b is not None and lv is not None:
            block_level[b] = max(block_level.get(b, 0), lv)

    executed = sorted((n for n in convs if n in trace), key=lambda n: trace[n][0])
    stem = next((n for n in executed if int(convs[n].in_channels) == in_chans), executed[0] if executed else None)
    last = executed[-1] if executed else None
    head = last if last is not None and last != stem and blocks[last] is None else None
    lin_exec = sorted((n for n in linears if n in trace), key=lambda n: trace[n][0])
    classifier = lin_exec[-1] if lin_exec else None
    get_cls = getattr(model, "get_classifier", None)
    if callable(get_cls):
        try:
            cls_mod = get_cls()
            classifier = next((n for n, m in linears.items() if m is cls_mod), classifier)
        except Exception:  # noqa: BLE001 - not every get_classifier returns a module
            pass

    def stage_of(name: str) -> int | None:
        if name == stem:
            return 0
        for pat in _STAGE_PATTERNS:
            m = pat.search(name)
            if m:
                return int(m.group(1))
        b = blocks.get(name)
        if b is not None and b in block_level:
            return block_level[b]
        return level(name)

    reports: list[LayerReport] = []
    for name, m in convs.items():
        shape, k, s, g = _conv_geometry(m)
        if name not in trace:
            role = "unused"
        elif name == stem:
            role = "stem"
        elif name == head:
            role = "head"
        elif k == (1, 1):
            role = "pointwise"
        elif g == int(m.in_channels) and g > 1:
            role = "depthwise"
        else:
            role = "dense"
        op = op_name_of(m) or ("conv" if isinstance(m, nn.Conv2d) else type(m).__name__)
        reports.append(LayerReport(name, role, stage_of(name), shape, k, s, g, op=op, module=m))
    for name, m in linears.items():
        role = "classifier" if name == classifier else ("linear" if name in trace else "unused")
        reports.append(LayerReport(name, role, None, (int(m.out_features), int(m.in_features)), (),
                                   op=op_name_of(m) or "linear", module=m))
    for name, role in internal.items():
        m = named[name]
        if isinstance(m, nn.Conv2d):
            shape, k, s, g = _conv_geometry(m)
            reports.append(LayerReport(name, role, None, shape, k, s, g, op="conv", module=m))
    order = {n: i for i, n in enumerate(named)}
    reports.sort(key=lambda r: (trace[r.name][0] if r.name in trace else 10**9 + order[r.name]))
    return reports
