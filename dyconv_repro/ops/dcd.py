"""`dcd`: Dynamic Convolution Decomposition (Li et al., ICLR 2021, arXiv 2103.08756).

    W(x) = Lambda(x) W0 + P Phi(x) Q^T

A static kernel W0 scaled per output channel by Lambda(x) (dynamic channel-wise attention) plus a dynamic
channel fusion Phi(x) (L x L) in a latent space of dimension L << C: Q compresses the input channels to L, P
expands to C_out. Compared with DY-Conv's K kernels this adds only L*(C_in + C_out) + L^2 parameters per layer.
Following the official liyunsheng13/dcd models (resnet_dcd.py, mobilenetv2_dcd.py):

- dynamic branch: pool (1x1, or 2x2 with the four cells concatenated) -> FC (no bias) to `squeeze` -> a
  gate y * hsigmoid(FC(y)) -> FC to L*L (Phi) and FC to C_out followed by hsigmoid (Lambda), where
  hsigmoid(t) = relu6(t + 3) / 3 (so Lambda lies in [0, 2]);
- latent path: z = BN1(Q x), out_latent = BN2(Phi z) + z, then P; for a k x k conv Q is a 1x1 conv with the
  layer's stride, i.e. the centre tap of the k x k kernel. Both BNs are affine at any one step (batch or
  running statistics), so the whole layer is one per-sample kernel W(x) plus a per-sample bias:
      W(x) = diag(Lambda) W0 + centre(P (I + diag(a2) Phi) diag(a1) Q),  b(x) = P((I + diag(a2) Phi) c1 + c2)
  with BN_i(t) = a_i t + c_i. In training the batch statistics are computed from Q x and Phi z like nn.BatchNorm
  (and update the running statistics once per call).
- `op.fused = False` runs the official unfused form instead (`training_forward`; equal, tested): cheaper
  than composing the kernel where C_out * C_in * L exceeds the per-pixel latent path.
- grouped / depthwise convs have no room for a dense C_out x C_in fusion term: there the op is
  Lambda(x) W0 only (the official models keep depthwise convs static).

The latent dimension L and the squeeze width follow `rule`: "paper" (L = C_in // 2^floor(log2 sqrt(C_in))),
"resnet" (official conv_dy, ResNet-50: L = int(sqrt(C_in))), "resnet_basic" (official conv_basic_dy, ResNet-18:
2x2 pooling, L = int(sqrt(4 C_in))), "mobilenet_v2" (official DYModule: 2x2 pooling when the layer expands,
L = min(C_in*p/r, C_out/r) with r halving until L^2 <= 2 C_in p, at least 4). `latent_dim` overrides L.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import DynamicConvOp, gap
from dyconv_repro.ops.layers import init_bank_like_
from dyconv_repro.ops.registry import OPS

RULES = ("paper", "resnet", "resnet_basic", "mobilenet_v2")
MIN_SQUEEZE = 4


def hsigmoid(t: Tensor) -> Tensor:
    """The official Hsigmoid: relu6(t + 3) / 3."""
    return F.relu6(t + 3.0) / 3.0


def dcd_dims(in_channels: int, out_channels: int, rule: str, fc_squeeze: int = 16) -> tuple[int, int, int]:
    """(latent dim L, pooled grid size, squeeze width) of the official rules (module docstring)."""
    cin, cout = int(in_channels), int(out_channels)
    if rule == "paper":
        pool, dim = 1, cin // 2 ** int(math.floor(math.log2(math.sqrt(cin))))
    elif rule == "resnet":
        pool, dim = 1, int(math.sqrt(cin))
    elif rule == "resnet_basic":
        pool, dim = 2, int(math.sqrt(cin * 4))
    elif rule == "mobilenet_v2":
        pool, red = (2, 8) if cin < cout else (1, 2)
        mul = pool * pool
        dim = min(cin * mul // red, cout // red)
        while dim ** 2 > cin * mul * 2:
            red *= 2
            dim = min(cin * mul // red, cout // red)
        dim = max(dim, 4)
    else:
        raise UserError(f"dcd rule {rule!r} is not valid; choose one of {', '.join(RULES)}")
    squeeze = max(max(cin * pool * pool, dim ** 2) // int(fc_squeeze), MIN_SQUEEZE)
    return dim, pool, squeeze


def _bn_affine(bn: nn.modules.batchnorm._BatchNorm, t: Tensor | None = None,
               dims: tuple[int, ...] = (0, 2)) -> tuple[Tensor, Tensor]:
    """(a, c) with bn(t) == a * t + c per channel (dim 1): the batch's statistics over `dims` in training (the
    running statistics updated like nn.BatchNorm does), the running ones in eval, without `t` or for a single
    value per channel (where nn.BatchNorm would refuse)."""
    n = 0 if t is None else t.numel() // t.shape[1]
    if bn.training and n > 1:
        mean = t.mean(dim=dims)
        var = t.var(dim=dims, unbiased=False)
        with torch.no_grad():
            m = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked + 1)
            bn.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
            bn.running_var.mul_(1 - m).add_(var.detach() * n / (n - 1), alpha=m)
            bn.num_batches_tracked.add_(1)
    else:
        mean, var = bn.running_mean, bn.running_var
    a = bn.weight / torch.sqrt(var + bn.eps)
    return a, bn.bias - a * mean


@OPS.register("dcd", help="DCD: static kernel x channel attention + dynamic channel fusion P Phi(x) Q^T (ICLR 2021)")
class DCDConv2d(DynamicConvOp):
    """Dynamic convolution decomposition; the fusion term for groups == 1, the channel attention everywhere."""


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, latent_dim: int | None = None, rule: str = "paper", fc_squeeze: int = 16,
                 *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if int(fc_squeeze) < 1:
            raise UserError(f"dcd fc_squeeze must be >= 1, got {fc_squeeze}")
        dd = dict(device=device, dtype=dtype)
        dim, self.pool, squeeze = dcd_dims(in_channels, out_channels, rule, fc_squeeze)
        self.rule, self.fc_squeeze = rule, int(fc_squeeze)
        top = min(self.in_channels, self.out_channels)
        if latent_dim is not None:
            if int(latent_dim) != latent_dim or not 1 <= int(latent_dim) <= top:
                raise UserError(f"dcd latent_dim must be an integer in [1, min(in_channels, out_channels)] = "
                                f"[1, {top}] for a {in_channels}->{out_channels} conv, got {latent_dim}")
            dim = int(latent_dim)
            squeeze = max(max(self.in_channels * self.pool ** 2, dim ** 2) // self.fc_squeeze, MIN_SQUEEZE)
        self.fusion = self.groups == 1
        self.latent_dim = min(dim, top) if self.fusion else 0
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.fc = nn.Linear(in_channels * self.pool ** 2, squeeze, bias=False, **dd)
        self.gate = nn.Linear(squeeze, squeeze, bias=False, **dd)
        self.fc_scale = nn.Linear(squeeze, out_channels, bias=False, **dd)
        if self.fusion:
            L = self.latent_dim
            self.q = nn.Parameter(torch.empty(L, in_channels, **dd))
            self.p = nn.Parameter(torch.empty(out_channels, L, **dd))
            self.bn1 = nn.BatchNorm1d(L, **dd)
            self.bn2 = nn.BatchNorm1d(L, **dd)
            self.fc_phi = nn.Linear(squeeze, L * L, bias=False, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init: convs normal(0, sqrt(2 / (k*k*C_out))) (W0, Q, P), linears normal(0, 0.01), BN 1/0."""
        kh, kw = self.kernel_size
        nn.init.normal_(self.weight, 0.0, math.sqrt(2.0 / (kh * kw * self.out_channels)))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        for fc in (self.fc, self.gate, self.fc_scale) + ((self.fc_phi,) if self.fusion else ()):
            nn.init.normal_(fc.weight, 0.0, 0.01)
        if self.fusion:
            nn.init.normal_(self.q, 0.0, math.sqrt(2.0 / self.latent_dim))
            nn.init.normal_(self.p, 0.0, math.sqrt(2.0 / self.out_channels))

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: W0 (the static part) at the replaced conv's scale; the latent factors keep their own init."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def load_static_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """W0 := the replaced conv's kernel (and bias): DCD's static part is exactly that layer."""
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise UserError(f"dcd: static weight has shape {tuple(weight.shape)}, expected {tuple(self.weight.shape)}")
        with torch.no_grad():
            self.weight.copy_(weight.detach().to(self.weight))
            if self.bias is not None:
                self.bias.copy_(bias.detach().to(self.bias)) if bias is not None else self.bias.zero_()

    def dynamic_branch(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(Lambda (B, C_out), Phi (B, L, L) or None)."""
        pooled = gap(x) if self.pool == 1 else F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        y = self.fc(pooled)
        y = y * hsigmoid(self.gate(y))
        lam = hsigmoid(self.fc_scale(y))
        phi = self.fc_phi(y).view(-1, self.latent_dim, self.latent_dim) if self.fusion else None
        return lam, phi

    def _centre(self) -> tuple[int, int]:
        return ((self.kernel_size[0] - 1) // 2, (self.kernel_size[1] - 1) // 2)

    def _latent_input(self, x: Tensor) -> Tensor:
        """Q x at the positions the kernel's centre tap reads: (B, L, H_out * W_out)."""
        ch, cw = self._centre()
        (ph, pw), (dh, dw), (sh, sw) = self.padding, self.dilation, self.stride
        if (dh * ch, dw * cw) == (ph, pw):  # 'same' padding: the centre tap reads x[s*i, s*j]
            xs = x[:, :, ::sh, ::sw]
            ho = (x.shape[2] + 2 * ph - dh * (self.kernel_size[0] - 1) - 1) // sh + 1
            wo = (x.shape[3] + 2 * pw - dw * (self.kernel_size[1] - 1) - 1) // sw + 1
            z = F.conv2d(xs[:, :, :ho, :wo], self.q[:, :, None, None])
        else:  # any other geometry: the centre-only k x k conv itself
            w = self.q.new_zeros(self.latent_dim, self.in_channels, *self.kernel_size)
            w[:, :, ch, cw] = self.q
            z = F.conv2d(x, w, None, self.stride, self.padding, self.dilation)
        return z.flatten(2)

    def kernel(self, x: Tensor):
        lam, phi = self.dynamic_branch(x)
        b = x.shape[0]
        w = lam[:, :, None, None, None] * self.weight.unsqueeze(0)
        bias = None if self.bias is None else self.bias.unsqueeze(0).expand(b, -1)
        if not self.fusion:
            return w, bias
        if self.bn1.training or self.bn2.training:  # batch statistics need the latent activations
            z1 = self._latent_input(x)
            a1, c1 = _bn_affine(self.bn1, z1, (0, 2))
            z = a1[:, None] * z1 + c1[:, None]
            a2, c2 = _bn_affine(self.bn2, torch.bmm(phi, z), (0, 2))
        else:  # running statistics: the kernel needs no pass over x
            (a1, c1), (a2, c2) = _bn_affine(self.bn1), _bn_affine(self.bn2)
        eye = torch.eye(self.latent_dim, device=x.device, dtype=x.dtype)
        mix = eye + a2[:, None] * phi  # (B, L, L) = I + diag(a2) Phi
        fused = torch.matmul(self.p, torch.matmul(mix * a1, self.q))  # (B, C_out, C_in)
        ch, cw = self._centre()
        centre = torch.zeros_like(w)
        centre[:, :, :, ch, cw] = fused
        w = w + centre
        b_dyn = torch.matmul(self.p, (torch.matmul(mix, c1) + c2).unsqueeze(-1)).squeeze(-1)  # (B, C_out)
        return w, b_dyn if bias is None else b_dyn + bias

    def training_forward(self, x: Tensor) -> Tensor:
        """The official unfused form (op.fused = False): Lambda * conv(x, W0) + P(BN2(Phi z) + z), z = BN1(Q x),
        with the latent path run per pixel instead of composed into the kernel; equal to the fused form."""
        lam, phi = self.dynamic_branch(x)
        y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        y = y * lam[:, :, None, None]
        if self.fusion:
            z1 = self._latent_input(x)
            a1, c1 = _bn_affine(self.bn1, z1)
            z = a1[:, None] * z1 + c1[:, None]
            u = torch.bmm(phi, z)
            a2, c2 = _bn_affine(self.bn2, u)
            latent = a2[:, None] * u + c2[:, None] + z
            y = y + torch.matmul(self.p, latent).view_as(y)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", latent_dim={self.latent_dim}, rule={self.rule!r}, pool={self.pool}, "
                f"squeeze={self.fc.out_features}")
