"""Is torch.compile's training step wrong for DY-Conv, or is fp32 the wrong yardstick? (torch only, CPU)

Issue 23 measured a compiled ResNet-20 DY-Conv step (inductor, CPU) against eager: equal loss, but parameter
gradients off by a median 1e-3 relative (max 0.4), and took it for an inductor lowering bug. This script is
the reduction, written for an upstream report. It does not support one:

1. In fp32, compiled vs eager gradients differ by O(1e-3).
2. Eager alone differs by the same amount when the input is laid out channels_last. No compiler is involved.
   Inductor on CPU converts conv graphs to channels_last (`torch._inductor.config.layout_optimization`), and
   with `layout_optimization=False` the compiled step matches eager to fp32 rounding (~1e-6).
3. In fp64 the compiled step, with the same channels_last lowering, equals eager to ~1e-14.
4. The cause is a kink, not a wrong formula. A handful of ReLU inputs lie within fp32 rounding of zero and
   change sign when the summation order changes. Each flip passes or blocks one gradient element, and the
   change propagates to every earlier layer. The script counts the flips between the eager fp32
   channels_last run and the fp64 reference.

Any fp32 comparison of two valid summation orders through a ReLU network can show this, which is why
tests/test_compile.py compares compiled and eager in fp64.

    python scripts/compile_vs_eager_gradients.py [--blocks 3] [--batch 8] [--backend inductor]

Exit 1 only when the fp64 compiled step differs from eager by more than --tol64 (that would be a real
lowering bug); 0 otherwise.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn


class DyConv(nn.Module):
    """DY-Conv (Chen et al. 2020). Attention pi = softmax(FC2(ReLU(FC1(GAP(x)))) / tau) mixes K kernels per
    sample. The kernels are applied as one grouped conv with the batch folded into the groups."""

    def __init__(self, cin: int, cout: int, stride: int = 1, kernels: int = 4, reduction: int = 4,
                 tau: float = 30.0):
        super().__init__()
        hidden = max(cin // reduction, 4)
        self.weight = nn.Parameter(torch.randn(kernels, cout, cin, 3, 3) * (2.0 / (cout * 9)) ** 0.5)
        self.attention = nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(), nn.Linear(hidden, kernels))
        self.stride, self.tau = stride, tau

    def forward(self, x):
        b, c, h, w = x.shape
        pi = torch.softmax(self.attention(x.mean((2, 3))) / self.tau, dim=1)  # (B, K)
        kernel = torch.einsum("bk,koihw->boihw", pi, self.weight).reshape(-1, c, 3, 3)
        out = F.conv2d(x.reshape(1, b * c, h, w), kernel, stride=self.stride, padding=1, groups=b)
        return out.reshape(b, -1, *out.shape[-2:])


class Block(nn.Module):
    """ResNet basic block with option-A shortcut (subsample + zero channel pad), as in the CIFAR ResNets."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = DyConv(cin, cout, stride), nn.BatchNorm2d(cout), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = DyConv(cout, cout), nn.BatchNorm2d(cout), nn.ReLU()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x):
        identity = x[:, :, ::self.stride, ::self.stride]
        if self.pad:
            identity = F.pad(identity, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + identity)


def resnet(blocks: int) -> nn.Module:
    """ResNet-(6n+2) for 32x32 inputs with every 3x3 conv of the blocks dynamic (n = blocks per stage)."""
    layers, cin = [nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()], 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(blocks):
            layers.append(Block(cin, cout, 2 if stage and i == 0 else 1))
            cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def grads(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return {n.removeprefix("_orig_mod."): p.grad.detach().double() for n, p in model.named_parameters()}


def compare(a: dict, b: dict) -> tuple[float, float]:
    """(median, max) over parameters of |a - b| / |b|."""
    rel = sorted(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)
    return rel[len(rel) // 2], rel[-1]


def relu_inputs(model: nn.Module, x) -> list[torch.Tensor]:
    """The input of every nn.ReLU call, in call order (one forward, no grad)."""
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().double()))
               for m in model.modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def compiled_grads(model: nn.Module, x, y, backend: str, **inductor_options) -> dict[str, torch.Tensor]:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(inductor_options):
        return grads(torch.compile(copy.deepcopy(model), backend=backend), x, y)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=3, help="blocks per stage (3 = ResNet-20)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--backend", default="inductor")
    ap.add_argument("--tol64", type=float, default=1e-9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model = resnet(args.blocks).train()
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    model64, x64 = copy.deepcopy(model).double(), x.double()
    print(f"torch {torch.__version__}, ResNet-{6 * args.blocks + 2} DY-Conv, batch {args.batch}, "
          f"backend {args.backend}, CPU")

    ref64 = grads(copy.deepcopy(model64), x64, y)
    eager = grads(copy.deepcopy(model), x, y)
    rows = [
        ("fp32 eager NCHW           vs fp64 eager", compare(eager, ref64)),
        ("fp32 eager channels_last  vs fp64 eager", compare(grads(copy.deepcopy(model), x_cl, y), ref64)),
        ("fp32 compiled             vs fp32 eager", compare(compiled_grads(model, x, y, args.backend), eager)),
        ("fp32 compiled, no layout opt vs fp32 eager",
         compare(compiled_grads(model, x, y, args.backend, layout_optimization=False), eager)),
    ]
    err64 = compare(compiled_grads(model64, x64, y, args.backend, force_layout_optimization=True), ref64)
    rows.append(("fp64 compiled (channels_last) vs fp64 eager", err64))
    print(f"{'relative gradient error, over parameters':<46} {'median':>9} {'max':>9}")
    for name, (median, worst) in rows:
        print(f"  {name:<44} {median:9.2e} {worst:9.2e}")

    signs32 = relu_inputs(model, x_cl)
    signs64 = relu_inputs(model64, x64)
    flips = [(a, b) for a32, a64 in zip(signs32, signs64) for a, b in zip(a32[(a32 > 0) != (a64 > 0)].tolist(),
                                                                        a64[(a32 > 0) != (a64 > 0)].tolist())]
    total = sum(t.numel() for t in signs64)
    print(f"ReLU inputs whose sign differs, fp32 channels_last vs fp64: {len(flips)} of {total}"
          + (f" (largest |value| {max(max(abs(a), abs(b)) for a, b in flips):.1e})" if flips else ""))
    lowering_bug = err64[1] > args.tol64
    print("fp64 compiled step " + ("DIFFERS from eager: a lowering bug" if lowering_bug else
                                   "equals eager: the fp32 differences are rounding through ReLU kinks"))
    return 1 if lowering_bug else 0


if __name__ == "__main__":
    sys.exit(main())
