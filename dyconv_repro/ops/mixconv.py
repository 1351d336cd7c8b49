"""`mixconv`: MixConv (Tan & Le, BMVC 2019, arXiv 1907.09595) -- several kernel sizes inside one conv.

The channels are split into groups; group i uses a (2i+1)x(2i+1) kernel (3, 5, 7, ...) and the outputs
are concatenated. Main use: in place of a depthwise conv. With `groups=1` each split is a dense conv on
its own input split (block-diagonal, like timm's `MixedConv2d` and the TF `GroupedConv2D`).

Splitting unit: for `groups=1` the input and output channels are split independently; for `groups>1`
whole conv groups are split, so depthwise (with or without a channel multiplier) and grouped convs keep
their group structure.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.engine.dispatch import mixconv_impl
from dyconv_repro.ops.layers import draw_like_
from dyconv_repro.ops.registry import OPS

SPLITS = ("equal", "exp")


def split_channels(total: int, num_groups: int, split: str = "equal") -> list[int]:
    """Sizes of the `num_groups` splits of `total` units.

    equal: `total // g` each, the remainder goes to the FIRST group (official TF `_split_channels`).
    exp:   group i gets `total // 2**(i+1)` (the paper's "2^-i portion"), the last group takes the rest,
           e.g. 32 units in 4 groups -> (16, 8, 4, 4).
    """
    if num_groups < 1:
        raise UserError(f"mixconv: num_groups must be >= 1, got {num_groups}")
    if split == "equal":
        sizes = [total // num_groups] * num_groups
        sizes[0] += total - sum(sizes)
    elif split == "exp":
        sizes = [total // 2 ** (i + 1) for i in range(num_groups - 1)]
        sizes.append(total - sum(sizes))
    else:
        raise UserError(f"mixconv: unknown split {split!r}; valid choices: {', '.join(SPLITS)}")
    if min(sizes) < 1:
        raise UserError(
            f"mixconv: cannot split {total} channel units into {num_groups} non-empty '{split}' groups "
            f"(sizes {sizes}); use fewer kernel sizes or split='equal'")
    return sizes


def resolve_kernel_sizes(num_groups: int | None, kernel_sizes) -> list[int]:
    """`num_groups` wins when set (kernels 3, 5, ..., 2g+1) unless `kernel_sizes` has exactly g entries.

    This lets a sweep override `op.kwargs.num_groups=4` while the config keeps `kernel_sizes: [3,5,7]`.
    """
    if kernel_sizes is not None:
        kernel_sizes = [int(k) for k in (kernel_sizes if isinstance(kernel_sizes, (list, tuple)) else [kernel_sizes])]
    if num_groups is not None:
        if kernel_sizes is not None and len(kernel_sizes) == int(num_groups):
            return kernel_sizes
        return [2 * i + 3 for i in range(int(num_groups))]
    if not kernel_sizes:
        return [3, 5, 7]
    return kernel_sizes


@OPS.register("mixconv", help="MixConv: channel groups with kernels 3,5,7,... (num_groups|kernel_sizes, split, dilated)")
class MixConv(ConvOp):
    """Mixed-kernel conv, a drop-in for the conv it replaces (same output shape).

    The replaced conv's `kernel_size` only fixes the output geometry: group i with kernel k_i (dilation
    d_i) gets padding p_i = p + (d_i (k_i - 1) - d (k - 1)) / 2 so that every group has the output size
    of the replaced conv (k, p, d). With `padding=None` ('same') that is the usual k_i // 2.

    `dilated=True` replaces a k_i x k_i kernel by a 3x3 kernel with dilation (k_i - 1) / 2 (same
    receptive field), at stride-1 layers only (the paper's setting); stride-2 layers keep large kernels.

    Two exact ways to run it: "split" runs one conv per group and concatenates; "fused" zero-pads every
    group's kernel to the largest size and runs ONE conv (`fused_weight()`; only for groups > 1, costs the
    largest kernel's FLOPs). `impl="auto"` leaves the choice to the engine (`dispatch.mixconv_impl`, by
    device type); "split" / "fused" force one, except while exporting, where the split's plain convs run
    (the fused kernel would be built inside the exported graph). `reparameterize()` emits the fused conv as a
    plain nn.Conv2d for deployment.
    """


    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, num_groups=None, kernel_sizes=None, split="equal", dilated=False,
                 impl="auto", *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if impl not in ("auto", "split", "fused"):
            raise UserError(f"mixconv: unknown impl {impl!r}; valid choices: auto, split, fused")
        ks = resolve_kernel_sizes(num_groups, kernel_sizes)
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise UserError(f"mixconv: kernel_sizes must be odd positive integers, got {ks}")
        if any(k % 2 == 0 for k in self.kernel_size):
            raise UserError(
                f"mixconv: the replaced conv must have an odd kernel_size (got {self.kernel_size}) so that "
                "every group can be centred on the same output grid")
        self.kernel_sizes = ks
        self.split = split
        self.dilated = bool(dilated)
        if self.dilated and self.dilation != (1, 1):
            raise UserError("mixconv: dilated=True needs a replaced conv with dilation=1")
        use_dil = self.dilated and self.stride == (1, 1)
        g = len(ks)
        # per-group (kernel, dilation): dilated mode keeps the receptive field with a 3x3 kernel
        self.group_geometry = [
            (3, (k - 1) // 2) if (use_dil and k > 3) else (k, self.dilation[0]) for k in ks]
        if self.dilation[0] != self.dilation[1]:
            raise UserError(f"mixconv: needs a square dilation, got {self.dilation}")

        if self.groups == 1:
            in_splits = split_channels(self.in_channels, g, split)
            out_splits = split_channels(self.out_channels, g, split)
            conv_groups = [1] * g
        else:
            units = split_channels(self.groups, g, split)
            cin_g, cout_g = self.in_channels // self.groups, self.out_channels // self.groups
            in_splits = [u * cin_g for u in units]
            out_splits = [u * cout_g for u in units]
            conv_groups = units
        self.in_splits, self.out_splits = in_splits, out_splits

        self.convs = nn.ModuleList()
        for (k, d), ci, co, cg in zip(self.group_geometry, in_splits, out_splits, conv_groups):
            pad = []
            for kk, p, dd in zip(self.kernel_size, self.padding, self.dilation):
                twice = 2 * p + d * (k - 1) - dd * (kk - 1)
                if twice < 0:
                    raise UserError(
                        f"mixconv: kernel {k} cannot reproduce the output size of a {self.kernel_size} conv "
                        f"with padding {self.padding}; use padding=None ('same') or larger kernel_sizes")
                pad.append(twice // 2)
            self.convs.append(nn.Conv2d(ci, co, k, stride=self.stride, padding=tuple(pad), dilation=d,
                                        groups=cg, bias=bias, device=device, dtype=dtype))
        if impl == "fused" and self.groups == 1 and g > 1:
            raise UserError("mixconv: impl='fused' needs groups > 1 (a fused dense conv would not be "
                            "block-diagonal); use impl='split' or 'auto'")
        self.impl = impl

    @torch.no_grad()
    def init_like(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Surgery: each group's kernel at the replaced conv's scale times k / k_i (the kernel-size part of the
        fan a backbone's initializer divides by), so a group with the replaced kernel size gets its std."""
        k = self.kernel_size[0]
        for conv, (ki, _) in zip(self.convs, self.group_geometry):
            draw_like_(conv.weight, weight, k / ki)
            if conv.bias is not None:
                if bias is None:
                    conv.bias.zero_()
                else:
                    draw_like_(conv.bias, bias)

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple[int, int], tuple[int, int]]:
        """One kernel of the largest effective size holding every group's kernel (dilations expanded)."""
        eff = [d * (k - 1) + 1 for k, d in self.group_geometry]
        kmax = max(eff)
        ws = []
        for conv, (k, d) in zip(self.convs, self.group_geometry):
            w = conv.weight
            if d > 1:  # spread a dilated kernel into its dense receptive field
                dense = w.new_zeros(w.shape[0], w.shape[1], d * (k - 1) + 1, d * (k - 1) + 1)
                dense[:, :, ::d, ::d] = w
                w = dense
            m = (kmax - w.shape[-1]) // 2
            ws.append(F.pad(w, (m, m, m, m)))
        weight = torch.cat(ws, 0)
        bias = torch.cat([c.bias for c in self.convs]) if self.use_bias else None
        # the largest group's padding is the fused padding (all groups share the output grid)
        pad = self.convs[max(range(len(eff)), key=lambda i: eff[i])].padding
        return weight, bias, pad, (1, 1)

    @torch.no_grad()
    def reparameterize(self) -> nn.Module:
        """The plain conv equal to this layer where one exists at the layer's own group structure: one group
        of kernel sizes (that conv itself), or groups > 1 (the fused kernel, `fused_weight()`, as an
        nn.Conv2d: a depthwise MixConv becomes a depthwise conv of the largest kernel). With groups=1 and
        several kernel sizes the equal plain conv is dense with structural zero blocks (g times the MAdds), so
        the layer is kept (its split form is already plain convs)."""
        if len(self.convs) == 1:
            return self.convs[0]
        if self.groups == 1:
            return self
        weight, bias, pad, dil = self.fused_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, weight.shape[-2:], self.stride, pad, dil, self.groups,
                         bias=bias is not None, device=weight.device, dtype=weight.dtype)
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.convs) == 1:
            return self.convs[0](x)
        if mixconv_impl(self, x) == "fused":
            w, b, pad, dil = self.fused_weight()
            return F.conv2d(x, w, b, self.stride, pad, dil, self.groups)
        xs = torch.split(x, self.in_splits, dim=1)
        return torch.cat([conv(xi) for conv, xi in zip(self.convs, xs)], dim=1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", kernel_sizes={self.kernel_sizes}, split={self.split!r}, "
                f"splits={self.in_splits}, dilated={self.dilated}, impl={self.impl!r}")
