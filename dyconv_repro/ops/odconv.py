"""`odconv`: Omni-Dimensional Dynamic Convolution (Li, Zhou, Yao, ICLR 2022, arXiv 2209.07947).

One SE-style body h = ReLU(BN(FC(GAP(x)))) (FC without bias, hidden width max(C_in * reduction, 16)) feeds four
heads, all divided by the temperature tau before their activation (official OSVAI/ODConv `modules/odconv.py`):

    a_s = sigmoid(FC_s(h) / tau)   (B, k*k)    spatial: one weight per kernel tap, shared by all kernels
    a_c = sigmoid(FC_c(h) / tau)   (B, C_in)   input channel
    a_f = sigmoid(FC_f(h) / tau)   (B, C_out)  output channel (filter)
    a_w = softmax(FC_w(h) / tau)   (B, K)      kernel number

    W(x)[o, j] = a_f[o] * a_c[group(o), j] * sum_i a_w[i] * a_s * W_i[o, j]

The official code multiplies a_c into the input and a_f into the output; as a per-sample kernel both are the
same product. As there, a head that would be constant is skipped: a_f for depthwise convs (C_in == C_out ==
groups), a_s for 1x1 kernels, a_w for K = 1. tau starts at 1.0 like the official module; the official trainer
anneals it 30 -> 1 linearly per iteration over the first 10 epochs (`recipe.temperature`, as DY-Conv's).
Training from scratch at tau = 1 is unstable with the official module too (one-batch overfit of ResNet-20 at
lr 0.05 diverges with either, from the same weights); start at 30 and anneal over many steps.
The bias (the official op has none) is static and added after the attentions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import DynamicConvOp, aggregate, gap
from dyconv_repro.ops.layers import batch_norm, init_bank_like_
from dyconv_repro.ops.registry import OPS

MIN_HIDDEN = 16  # the official Attention's min_channel


def odconv_hidden(in_channels: int, reduction: float, min_hidden: int = MIN_HIDDEN) -> int:
    """Hidden width of the attention body: max(int(C_in * reduction), min_hidden) (official rule)."""
    return max(int(in_channels * float(reduction)), int(min_hidden))


def _head(hidden: int, out: int, dd: dict) -> nn.Linear:
    fc = nn.Linear(hidden, out, **dd)
    nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(fc.bias)
    return fc


@OPS.register("odconv", help="ODConv: K kernels (num_kernels=4) with spatial/in/out/kernel attentions (ICLR 2022)")
class ODConv2d(DynamicConvOp):
    """Omni-dimensional dynamic conv; regular, grouped and depthwise."""


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, num_kernels: int = 4, reduction: float = 0.0625, min_hidden: int = MIN_HIDDEN,
                 temperature: float = 1.0, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if int(num_kernels) != num_kernels or int(num_kernels) < 1:
            raise UserError(f"odconv num_kernels must be an integer >= 1 (1 = ODConv 1x, 4 = ODConv 4x), "
                            f"got {num_kernels}")
        if not 0 < float(reduction) <= 1:
            raise UserError(f"odconv reduction must be in (0, 1] (the paper's r = 1/16 = 0.0625), got {reduction}")
        if int(min_hidden) < 1:
            raise UserError(f"odconv min_hidden must be >= 1, got {min_hidden}")
        if float(temperature) <= 0:
            raise UserError(f"odconv temperature must be > 0, got {temperature}")
        dd = dict(device=device, dtype=dtype)
        self.num_kernels, self.reduction, self.min_hidden = int(num_kernels), float(reduction), int(min_hidden)
        kh, kw = self.kernel_size
        hidden = odconv_hidden(in_channels, reduction, min_hidden)
        self.weight = nn.Parameter(torch.empty(self.num_kernels, out_channels, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.fc = nn.Linear(in_channels, hidden, bias=False, **dd)
        self.bn = nn.BatchNorm1d(hidden, **dd)
        self.channel_fc = _head(hidden, in_channels, dd)
        depthwise = in_channels == groups == out_channels
        self.filter_fc = None if depthwise else _head(hidden, out_channels, dd)
        self.spatial_fc = None if kh * kw == 1 else _head(hidden, kh * kw, dd)
        self.kernel_fc = None if self.num_kernels == 1 else _head(hidden, self.num_kernels, dd)
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init: every kernel kaiming-normal (fan_out, relu), the attention FCs alike, biases 0."""
        for i in range(self.num_kernels):
            nn.init.kaiming_normal_(self.weight[i], mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: every kernel of the bank at the replaced conv's scale (the official kaiming-normal fan_out is
        what the paper's torchvision backbones use, so on them this is the official init)."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def set_temperature(self, t: float) -> None:
        if float(t) <= 0:
            raise UserError(f"odconv temperature must be > 0, got {t}")
        self.temperature.fill_(float(t))

    def attentions(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(a_c (B, C_in), a_f (B, C_out) | None, a_s (B, kh*kw) | None, a_w (B, K) | None)."""
        h = torch.relu(batch_norm(self.bn, self.fc(gap(x))))
        tau = self.temperature
        a_c = torch.sigmoid(self.channel_fc(h) / tau)
        a_f = None if self.filter_fc is None else torch.sigmoid(self.filter_fc(h) / tau)
        a_s = None if self.spatial_fc is None else torch.sigmoid(self.spatial_fc(h) / tau)
        a_w = None if self.kernel_fc is None else torch.softmax(self.kernel_fc(h) / tau, dim=1)
        return a_c, a_f, a_s, a_w

    def kernel(self, x: Tensor):
        a_c, a_f, a_s, a_w = self.attentions(x)
        b, g = x.shape[0], self.groups
        cout, cin_g, kh, kw = self.kernel_shape
        w = self.weight[0].unsqueeze(0) if a_w is None else aggregate(a_w, self.weight)
        if a_s is not None:
            w = w * a_s.view(b, 1, 1, kh, kw)
        # input-channel attention: output o of group q sees input channels q*cin_g .. (q+1)*cin_g - 1
        a_in = a_c.view(b, g, 1, cin_g).expand(b, g, cout // g, cin_g).reshape(b, cout, cin_g, 1, 1)
        w = w * a_in
        if a_f is not None:
            w = w * a_f.view(b, cout, 1, 1, 1)
        w = w.expand(b, *self.kernel_shape)
        return w, None if self.bias is None else self.bias.unsqueeze(0).expand(b, cout)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", num_kernels={self.num_kernels}, reduction={self.reduction:g}, "
                f"temperature={float(self.temperature):g}")


__all__ = ["ODConv2d", "odconv_hidden"]
