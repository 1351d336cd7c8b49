"""`dynamicconv`: Dynamic Convolution / DY-Conv (Chen et al., CVPR 2020, arXiv 1912.03458).

pi(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / tau), FC1: C_in -> C_in/reduction; the kernel and the bias are both
aggregated with pi: K kernels add capacity at the cost of one conv and a small attention. A large initial tau
(30) keeps the attention near uniform early so that all kernels train; tau lives in a buffer (saved in
state_dict) so a checkpoint keeps the annealing state, and `set_temperature(t)` is what the trainer's schedule
calls.

`inference_attention` replays the paper's "attention at inference" ablation on a trained model (eval mode only;
training always uses the learned attention): `average` (uniform pi: the average kernel), `argmax` (one-hot at the
largest pi), `shuffle_kernels` (pi permuted over the K kernels, per image: "shuffled within image"), and
`shuffle_images` (the batch's attentions randomly permuted over its images at this layer: "shuffled across
images"; a no-op at batch 1). `inference_dynamic_sizes` keeps the learned attention only in layers whose output is that many pixels wide
and averages the others ("dynamic only at 14x14 and 7x7"). The shuffles draw from torch's global RNG.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import BankMix, DynamicConvOp, aggregate, gap
from dyconv_repro.ops.layers import copy_static_into_bank, init_bank_like_, init_conv_bank_, mlp_head
from dyconv_repro.ops.registry import OPS
from dyconv_repro.ops.routing import SharedHead

INFERENCE_ATTENTION = ("learned", "average", "argmax", "shuffle_kernels", "shuffle_images")


def attention_hidden(in_features: int, reduction: int) -> int:
    return max(1, int(in_features) // int(reduction))


@OPS.register("dynamicconv", help="DY-Conv: K kernels (num_kernels=4) mixed by softmax(z/tau) attention")
class DynamicConv2d(DynamicConvOp):
    """Attention over K convolution kernels (and biases)."""


    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, num_kernels: int = 4, reduction: int = 4, temperature: float = 30.0,
                 init_from_static: bool = False, inference_attention: str = "learned",
                 inference_dynamic_sizes: list[int] | None = None, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if int(num_kernels) < 1 or int(reduction) < 1:
            raise UserError(f"dynamicconv needs num_kernels >= 1 and reduction >= 1, got {num_kernels}, {reduction}")
        if float(temperature) <= 0:
            raise UserError(f"dynamicconv temperature must be > 0, got {temperature}")
        if inference_attention not in INFERENCE_ATTENTION:
            raise UserError(f"dynamicconv inference_attention must be one of {', '.join(INFERENCE_ATTENTION)}, "
                            f"got {inference_attention!r}")
        self.inference_attention = str(inference_attention)
        self.inference_dynamic_sizes = None if inference_dynamic_sizes is None else tuple(
            int(v) for v in inference_dynamic_sizes)
        dd = dict(device=device, dtype=dtype)
        self.num_kernels, self.reduction = int(num_kernels), int(reduction)
        self.init_from_static = bool(init_from_static)  # read by surgery: copy the replaced conv into every kernel
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.num_kernels, out_channels, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(self.num_kernels, out_channels, **dd)) if bias else None
        self.attention = mlp_head(in_channels, self.num_kernels, attention_hidden(in_channels, self.reduction), **dd)
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_conv_bank_(self.weight, self.bias)

    def set_temperature(self, t: float) -> None:
        if float(t) <= 0:
            raise UserError(f"dynamicconv temperature must be > 0, got {t}")
        self.temperature.fill_(float(t))

    def attention_weights(self, x: Tensor) -> Tensor:
        """(B, K) softmax(z / tau); z from GAP(x), or from the pooled block input under block routing."""
        pooled = self.block_input() if self.block_routed else gap(x)
        pi = torch.softmax(self.attention(pooled) / self.temperature, dim=1)
        return self._ablated(pi, x) if self.ablates_attention else pi

    @property
    def ablates_attention(self) -> bool:
        """An inference ablation is set and the op is in eval mode (training never ablates)."""
        return not self.training and (self.inference_attention != "learned"
                                      or self.inference_dynamic_sizes is not None)

    def _ablated(self, pi: Tensor, x: Tensor) -> Tensor:
        """The attention-at-inference ablations (module docstring)."""
        uniform = torch.full_like(pi, 1.0 / self.num_kernels)
        if self.inference_dynamic_sizes is not None:
            size = (x.shape[-1] + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) \
                // self.stride[1] + 1
            if size not in self.inference_dynamic_sizes:
                return uniform
        mode = self.inference_attention
        if mode == "average":
            return uniform
        if mode == "argmax":
            return torch.nn.functional.one_hot(pi.argmax(dim=1), self.num_kernels).to(pi.dtype)
        if mode == "shuffle_kernels":
            order = torch.argsort(torch.rand(pi.shape, device=pi.device), dim=1)
            return torch.gather(pi, 1, order)
        if mode == "shuffle_images":
            return pi[torch.randperm(pi.shape[0], device=pi.device)]
        return pi

    def kernel(self, x: Tensor):
        pi = self.attention_weights(x)
        return aggregate(pi, self.weight), None if self.bias is None else aggregate(pi, self.bias)

    def kernel_factors(self, x: Tensor):
        pi = self.attention_weights(x)
        return pi, self.weight, None if self.bias is None else aggregate(pi, self.bias), BankMix

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: draw each of the K kernels at the replaced conv's scale, not PyTorch's default."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def load_static_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Copy a static conv's kernel (and bias) into every one of the K kernels."""
        copy_static_into_bank(self.weight, self.bias, weight, bias, "dynamicconv")

    @classmethod
    def block_head(cls, in_features: int, ops: list) -> nn.Module:
        """Each op keeps its own attention but reads the pooled *block* input."""
        return SharedHead(None, [in_features] * len(ops), share=True)

    def attach_block_routing(self, slot, in_features: int) -> None:
        super().attach_block_routing(slot, in_features)
        if in_features != self.in_channels:
            ref = next(self.attention.parameters())
            self.attention = mlp_head(in_features, self.num_kernels, attention_hidden(in_features, self.reduction),
                                      device=ref.device, dtype=ref.dtype)

    def extra_repr(self) -> str:
        ablation = "" if self.inference_attention == "learned" else f", inference_attention={self.inference_attention}"
        if self.inference_dynamic_sizes is not None:
            ablation += f", inference_dynamic_sizes={list(self.inference_dynamic_sizes)}"
        return (super().extra_repr() + f", num_kernels={self.num_kernels}, reduction={self.reduction}, "
                f"temperature={float(self.temperature):g}" + ablation)
