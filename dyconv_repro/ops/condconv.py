"""`condconv`: CondConv (Yang et al., NeurIPS 2019, arXiv 1904.04971): K experts mixed per sample.

r(x) = sigmoid(FC(GAP(x))) (FC with bias; softmax as the ablation option); W(x) = sum_i r_i W_i and the bias is
mixed alike. A conditionally parameterized layer is as expressive as a K times larger mixture but costs one conv
plus the mix. Experts are stored as one (K, C_out, C_in/g, k, k) bank, like the TF reference's
[K, prod(kernel_shape)]. `CondLinear` is the classifier form; block-shared routing follows the TF reference
(one router per MBConv block).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import BankMix, DynamicConvOp, aggregate, gap
from dyconv_repro.ops.layers import copy_static_into_bank, init_bank_like_, init_conv_bank_
from dyconv_repro.ops.registry import OPS
from dyconv_repro.ops.routing import SharedHead

ROUTINGS = ("sigmoid", "softmax")


def _check_routing(routing: str) -> str:
    if routing not in ROUTINGS:
        raise UserError(f"condconv routing {routing!r} is not valid; choose one of {', '.join(ROUTINGS)}")
    return routing


def _check_experts(num_experts) -> int:
    if int(num_experts) < 1:
        raise UserError(f"condconv num_experts must be >= 1, got {num_experts}")
    return int(num_experts)


def activate_routing(logits: Tensor, routing: str) -> Tensor:
    """Routing weights from (..., K) logits."""
    return torch.sigmoid(logits) if routing == "sigmoid" else torch.softmax(logits, dim=-1)


class CondLinear(nn.Module):
    """CondConv fully connected layer (the classifier form): y = (sum_i r_i W_i) x + sum_i r_i b_i.

    Computed as one (B, in) x (in, K*out) matmul followed by the per-sample mix of the K outputs,
    which is the same arithmetic as mixing the weights but never materializes B weight matrices.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, num_experts: int = 8,
                 routing: str = "sigmoid", *, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_experts = _check_experts(num_experts)
        self.routing = _check_routing(routing)
        self.weight = nn.Parameter(torch.empty(self.num_experts, out_features, in_features, **dd))
        self.bias = nn.Parameter(torch.empty(self.num_experts, out_features, **dd)) if bias else None
        self.router = nn.Linear(in_features, self.num_experts, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for i in range(self.num_experts):  # nn.Linear's own initializer, per expert
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def routing_weights(self, x: Tensor) -> Tensor:
        return activate_routing(self.router(x), self.routing)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        r = self.routing_weights(x2)
        y = torch.mm(x2, self.weight.reshape(-1, self.in_features).t())
        y = torch.bmm(r.unsqueeze(1), y.reshape(-1, self.num_experts, self.out_features)).squeeze(1)
        if self.bias is not None:
            y = y + r @ self.bias
        return y.reshape(*lead, self.out_features)

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: draw each expert at the replaced nn.Linear's scale (TF: each expert gets the layer's initializer)."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def load_static_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Copy a static nn.Linear's weight (and bias) into every expert."""
        copy_static_into_bank(self.weight, self.bias, weight, bias, "CondLinear")

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, "
                f"num_experts={self.num_experts}, routing={self.routing!r}")


@OPS.register("condconv", help="CondConv: K experts (num_experts=8) mixed by sigmoid routing GAP->FC")
class CondConv2d(DynamicConvOp):
    """Conditionally parameterized conv; regular, grouped and depthwise."""

    linear_form = CondLinear

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, num_experts: int = 8, routing: str = "sigmoid", init_from_static: bool = False,
                 *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        dd = dict(device=device, dtype=dtype)
        self.num_experts = _check_experts(num_experts)
        self.routing = _check_routing(routing)
        self.init_from_static = bool(init_from_static)  # read by surgery: copy the replaced conv into every expert
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, out_channels, in_channels // groups, kh, kw, **dd))
        self.bias = nn.Parameter(torch.empty(self.num_experts, out_channels, **dd)) if bias else None
        self.router = nn.Linear(in_channels, self.num_experts, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_conv_bank_(self.weight, self.bias)

    def routing_weights(self, x: Tensor) -> Tensor:
        """(B, K) expert weights; in block mode the block's shared router already computed them."""
        if self.block_routed:
            return self.block_input()
        return activate_routing(self.router(gap(x)), self.routing)

    def kernel(self, x: Tensor):
        r = self.routing_weights(x)
        return aggregate(r, self.weight), None if self.bias is None else aggregate(r, self.bias)

    def kernel_factors(self, x: Tensor):
        r = self.routing_weights(x)
        return r, self.weight, None if self.bias is None else aggregate(r, self.bias), BankMix

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: draw each expert at the replaced conv's scale (TF: each expert gets the layer's initializer)."""
        init_bank_like_(self.weight, self.bias, weight, bias)

    def load_static_weight(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Copy a static conv's kernel (and bias) into every expert."""
        copy_static_into_bank(self.weight, self.bias, weight, bias, "condconv")

    @classmethod
    def block_head(cls, in_features: int, ops: list) -> nn.Module:
        """TF reference: one router per block from the block input, shared by all its CondConvs."""
        spec = {(op.num_experts, op.routing) for op in ops}
        if len(spec) != 1:
            raise UserError(f"block-shared CondConv routing needs the same num_experts/routing in a block, got {spec}")
        k, routing = spec.pop()
        ref = ops[0].weight
        return SharedHead(nn.Linear(in_features, k, device=ref.device, dtype=ref.dtype), [k] * len(ops), share=True,
                          activation=routing)

    def attach_block_routing(self, slot, in_features: int) -> None:
        super().attach_block_routing(slot, in_features)
        self.router = None  # the block's router replaces the per-layer one

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_experts={self.num_experts}, routing={self.routing!r}"
