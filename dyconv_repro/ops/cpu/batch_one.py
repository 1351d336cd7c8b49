"""Batch-1 inference on CPU: the plain conv with the aggregated kernel, reached with as few calls as possible.

At batch 1 a dynamic layer's cost is per-call overhead, not arithmetic (3-12 us a dispatcher call, ~3 us a
view, ~2 us an nn.Module attribute lookup on the project's 2-core VM). So, for no-grad fp32 CPU calls at batch 1:

- the kernel is written into a reused scratch buffer (`scratch`) through views cached per layer (`OneViews`);
- CondConv, DY-Conv and WeightNet compute it with the fewest calls their math allows (`KERNEL_ONE`): the
  spatial sum as a (C,) vector, the routing as addmv calls with GAP's 1/(H*W) and DY-Conv's 1/tau folded into
  alpha/beta, the mix as one mv (bank) or mul (rows);
- where the native kernels are built those steps are one C++ call (csrc/batch_one.cpp), kept with its converted
  arguments as the layer's `NativeOnePlan`; the aten calls stay as its reference and fallback;
- 1x1 layers run as one mm (oneDNN's 1x1 conv is slower at batch 1 here).

Other ops take the generic path: `kernel_factors` mixed into scratch, else `kernel(x)`. The fwd b1 column of
results/benchmarks/ops_cpu.md and the b1 latency of the model pages measure this path.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dyconv_repro.ops.condconv import CondConv2d, activate_routing
from dyconv_repro.ops.cpu.kernels import loaded, no_dispatch_mode
from dyconv_repro.ops.cpu.scratch import scratch
from dyconv_repro.ops.cpu.stream import make_kernels
from dyconv_repro.ops.dynamicconv import DynamicConv2d
from dyconv_repro.ops.engine.paths import matmul_conv1x1, nchw_or_channels_last
from dyconv_repro.ops.layers import MLPHead, plain
from dyconv_repro.ops.weightnet import WeightNetConv2d

VIEWS, PLAN, TAU = "_backend_one_views", "_backend_one_plan", "_backend_tau"  # op.__dict__ caches (never saved)
ACT_NONE, ACT_RELU, ACT_SIGMOID, ACT_SOFTMAX = 0, 1, 2, 3  # activation codes of the native batch-1 kernel


def eligible(op, x: Tensor) -> bool:
    """This call is batch-1 fp32 inference without autocast (the caller checked: CPU, no export)."""
    return (x.shape[0] == 1 and not torch.is_grad_enabled() and op.path in ("auto", "fold")
            and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu"))


def inv_area(x: Tensor) -> float:
    """1 / (H*W) of x: GAP's division, folded into the first routing layer's alpha."""
    h, w = x.shape[-2:]
    return 1.0 / (h * w)


def spatial_sum_one(x: Tensor) -> tuple[Tensor, float]:
    """(x summed over N, H, W as a (C,) vector, 1 / (H*W)) -- GAP with the division left to the next addmv."""
    return x.sum((0, 2, 3)), inv_area(x)


def affine_vec(z: Tensor, linear: nn.Linear, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """alpha * (W @ z) + beta * b for one vector z as one addmv (W used as stored: no transpose view).
    Reads `_parameters` directly (nn.Module.__getattr__ costs ~2 us)."""
    params = linear._parameters
    weight, bias = params["weight"], params.get("bias")
    if bias is None:
        return torch.mv(weight, z).mul_(alpha)
    return torch.addmv(bias, weight, z, beta=beta, alpha=alpha)


def mlp_forward_one(head: MLPHead, z: Tensor, in_scale: float, out_scale: float = 1.0) -> Tensor:
    """out_scale * head(in_scale * z) for one pooled vector z (C,), as two addmv calls (scales folded in)."""
    fcs = head.linears()
    if fcs is not None:
        fc1, fc2 = fcs
        hidden = affine_vec(z, fc1, alpha=in_scale).relu_()
        return affine_vec(hidden, fc2, alpha=out_scale, beta=out_scale)
    return head(z * in_scale) * out_scale


class OneViews:
    """What the batch-1 path of one layer reuses call after call: its parameter as the 2-D operand of the mix
    (`src`), the layer's scratch kernel as the mix's `out`, and that kernel as the conv sees it (`kernel`, and
    `kernel2d` = (C_out, rest) for the 1x1 matmul). Rebuilt whenever the parameter's storage, the thread
    (scratch is per thread) or inference mode changes."""

    __slots__ = ("key", "param", "src", "out", "kernel", "kernel2d")

    def __init__(self, key, param: Tensor, src: Tensor, out: Tensor, kernel: Tensor):
        self.key, self.param, self.src, self.out, self.kernel = key, param, src, out, kernel
        self.kernel2d = kernel.view(kernel.shape[0], -1)


def one_views(op: nn.Module, param: Tensor, rows: int, bank: bool) -> OneViews:
    """The cached `OneViews` of `op` for `param` viewed as `rows` rows: a bank (K rows; the mix is
    `mv(src, coeff)`, src = (n, K)) or row-scaled (`rows` rows of the flat kernel; the mix is
    `mul(src, coeff)` with src = (entries, rows), i.e. each kernel row scaled by its coefficient)."""
    key = (threading.get_ident(), torch.is_inference_mode_enabled(), param.data_ptr())
    views = op.__dict__.get(VIEWS)
    if views is not None and views.key == key and views.param is param:
        return views
    shape = op.kernel_shape
    flat = scratch(shape, 0, param)[0]
    src = param.reshape(rows, -1).t()
    out = flat if bank else flat.view(rows, -1).t()
    views = OneViews(key, param, src, out, flat.view(shape))
    op.__dict__[VIEWS] = views
    return views


def bank_kernel_one(op: nn.Module, coeff: Tensor):
    """Batch-1 kernel (and bias) of an op whose `weight` / `bias` are banks of K kernels / biases:
    W = sum_k coeff[k] W_k written into the layer's scratch by one mv."""
    params = op._parameters
    bank, bias = params["weight"], params.get("bias")
    views = one_views(op, bank, bank.shape[0], bank=True)
    torch.mv(views.src, coeff, out=views.out)
    return views, None if bias is None else torch.mv(bias.t(), coeff)


def native_kernel_one(op: nn.Module, source: Tensor, pool: bool, layers, inner: int, final: int, param: Tensor,
                      bank: bool, bias_bank: Tensor | None = None, bias: Tensor | None = None):
    """The batch-1 kernel (`OneViews`, bias) by the native kernel in one call, or None when it is not
    available (the caller then runs the same math as aten calls). `source` is x when `pool` (the spatial
    sum is taken there), else the routing input vector; `layers` are (linear, alpha, beta) routing layers
    (z <- alpha * W z + beta * b) with `inner` between them and `final` after the last; the coefficients mix
    `param` as a bank of K kernels (`bank`) or scale its rows (WeightNet). The bias is `bias_bank` mixed the
    same way, else `bias` as given. The call is kept as the op's `NativeOnePlan`, which later calls reuse."""
    kernel = loaded()
    if kernel is None or not nchw_or_channels_last(source) or not no_dispatch_mode():
        return None
    weights, biases, alphas, betas = [], [], [], []
    for linear, alpha, beta in layers:
        params = linear._parameters
        weights.append(params["weight"])
        biases.append(params.get("bias"))
        alphas.append(alpha)
        betas.append(beta)
    views = one_views(op, param, param.shape[0], bank)
    call = kernel.BatchOnePlan(pool, weights, biases, alphas, betas, inner, final, param, 0 if bank else 1,
                               views.kernel, bias_bank)
    plan = op.__dict__[PLAN] = NativeOnePlan(op, kernel, call, source if pool else None, views,
                                             None if bias_bank is not None else bias)
    return plan.run_on(source)


class NativeOnePlan:
    """A layer's native batch-1 call with its arguments converted once (`BatchOnePlan`), and what they were
    derived from, so that later calls skip the op's Python routing code and the argument conversion.

    `run(op, x)` returns None, and the op takes its normal path (which builds a new plan), whenever a
    derived value may differ: another thread or inference mode (the scratch views), input shape (1/(H*W)),
    the op's `one_state` (DY-Conv's 1/tau), native code suspended or swapped, a dispatch mode active, the
    parameter's storage, any parameter, buffer or submodule of the op replaced, or a hook added inside it."""

    __slots__ = ("thread", "inference", "shape", "state", "native", "call", "views", "bias", "param", "param_ptr",
                 "deps", "hooks", "slot")

    def __init__(self, op: nn.Module, native_module, call, x: Tensor | None, views: OneViews, bias: Tensor | None):
        self.thread, self.inference = threading.get_ident(), torch.is_inference_mode_enabled()
        self.shape = None if x is None else x.shape  # pooling plans: the input shape (1/(H*W) is an alpha)
        self.state = one_state(op)
        self.native, self.call, self.views, self.bias = native_module, call, views, bias
        self.param, self.param_ptr = views.param, views.param.data_ptr()
        self.slot = op.__dict__.get("_slot")
        subs = list(op.modules())
        self.deps = tuple((store, k, v) for m in subs for store in (m._parameters, m._buffers, m._modules)
                          for k, v in store.items())
        self.hooks = tuple(d for m in subs[1:] for d in (m._forward_hooks, m._forward_pre_hooks))

    def run(self, op: nn.Module, x: Tensor):
        """(views, bias) for this input, or None when the plan may be stale (see the class docstring)."""
        if (self.thread != threading.get_ident() or self.inference != torch.is_inference_mode_enabled()
                or loaded() is not self.native or not no_dispatch_mode() or one_state(op) != self.state
                or op.__dict__.get("_slot") is not self.slot or self.param.data_ptr() != self.param_ptr
                or any(self.hooks)):
            return None
        for store, k, v in self.deps:
            if store.get(k) is not v:
                return None
        if self.shape is None:
            source = op.block_input()
        elif x.shape != self.shape or not nchw_or_channels_last(x):
            return None
        else:
            source = x
        return self.run_on(source)

    def run_on(self, source: Tensor):
        mixed = self.native.kernel_one_planned(self.call, source)
        return self.views, mixed if self.bias is None else self.bias


# ----------------------------------------------------------------------------- per-op batch-1 routing


def inverse_temperature(op: DynamicConv2d) -> float:
    """1 / tau as a float, re-read only when the buffer changes (set_temperature, load_state_dict, .to())."""
    t = op._buffers["temperature"]
    cache = op.__dict__.get(TAU)
    if cache is None or cache[0] is not t or cache[1] != t._version:
        cache = op.__dict__[TAU] = (t, t._version, 1.0 / t.item())
    return cache[2]


def one_state(op) -> float | None:
    """The op's own value (besides parameters and input shape) that its batch-1 routing depends on."""
    return inverse_temperature(op) if type(op) is DynamicConv2d else None


def condconv_one(op: CondConv2d, x: Tensor):
    """The router as one addmv on the spatial sum (1/HW as its alpha), one mv mix; under block routing the
    block's routing weights, mixed the same way."""
    params = op._parameters
    if op._slot is not None:  # the block's routing weights: nothing to pool or route
        coeff = op.block_input()
        one = native_kernel_one(op, coeff, False, (), ACT_NONE, ACT_NONE, params["weight"], True, params.get("bias"))
        return one if one is not None else bank_kernel_one(op, coeff.view(-1))
    router = op._modules["router"]
    if not plain(router, nn.Linear):
        return None
    act = ACT_SIGMOID if op.routing == "sigmoid" else ACT_SOFTMAX
    one = native_kernel_one(op, x, True, ((router, inv_area(x), 1.0),), ACT_NONE, act, params["weight"], True,
                            params.get("bias"))
    if one is not None:
        return one
    pooled, inv_hw = spatial_sum_one(x)
    return bank_kernel_one(op, activate_routing(affine_vec(pooled, router, alpha=inv_hw), op.routing))


def dynamicconv_one(op: DynamicConv2d, x: Tensor):
    """softmax(attention(sum / HW) / tau) with 1/HW and 1/tau inside the two addmvs, one mv mix."""
    head = op._modules["attention"]
    if type(head) is not MLPHead or op.ablates_attention:  # an inference ablation: the generic path applies it
        return None
    inv_tau = inverse_temperature(op)
    if op._slot is not None:  # block routing: the pooled block input (already divided by H*W)
        source, pool, inv_hw = op.block_input(), False, 1.0
    else:
        source, pool, inv_hw = x, True, inv_area(x)
    fcs = head.linears()
    if fcs is not None:
        params = op._parameters
        one = native_kernel_one(op, source, pool, ((fcs[0], inv_hw, 1.0), (fcs[1], inv_tau, inv_tau)),
                                ACT_RELU, ACT_SOFTMAX, params["weight"], True, params.get("bias"))
        if one is not None:
            return one
    pooled = spatial_sum_one(x)[0] if pool else source.view(-1)
    return bank_kernel_one(op, torch.softmax(mlp_forward_one(head, pooled, inv_hw, inv_tau), 0))


def weightnet_one(op: WeightNetConv2d, x: Tensor):
    """x_gap = reduce(sum / HW) and fc1 as two addmvs (1/HW as the first's alpha); with one fc2 column per row
    (M == G, the default) the kernel is fc2's rows scaled by a, one mul into scratch."""
    fc1, fc2 = op._modules["fc1"], op._parameters["fc2"]
    if fc2.shape[2] != 1 or not plain(fc1, nn.Linear):
        return None
    bias = op._parameters.get("bias")
    if op._slot is not None:  # block routing: the block's shared x_gap
        source, pool, reduce, layers = op.block_input(), False, None, ((fc1, 1.0, 1.0),)
    else:
        reduce = op._modules["reduce"]
        if not plain(reduce, nn.Linear):
            return None
        source, pool, layers = x, True, ((reduce, inv_area(x), 1.0), (fc1, 1.0, 1.0))
    one = native_kernel_one(op, source, pool, layers, ACT_NONE, ACT_SIGMOID, fc2, False, bias=bias)
    if one is not None:
        return one
    if pool:
        pooled, inv_hw = spatial_sum_one(x)
        x_gap = affine_vec(pooled, reduce, alpha=inv_hw)
    else:
        x_gap = source.view(-1)
    a = affine_vec(x_gap, fc1).sigmoid_()
    views = one_views(op, fc2, fc2.shape[0], bank=False)
    torch.mul(views.src, a, out=views.out)
    return views, bias


# exact classes only: a subclass may change the routing these functions hard-code
KERNEL_ONE = {CondConv2d: condconv_one, DynamicConv2d: dynamicconv_one, WeightNetConv2d: weightnet_one}


def kernel_one(op, x: Tensor):
    """(`OneViews` holding this sample's kernel, bias or None) by the op's specialized routing, or None."""
    fn = KERNEL_ONE.get(type(op))
    return None if fn is None else fn(op, x)


def pointwise_one(x: Tensor, weight2d: Tensor, bias: Tensor | None, stride) -> Tensor:
    """Batch-1 1x1 conv (zero padding, groups=1) as one mm on the (C_in, H*W) view of a contiguous x;
    other memory formats / strides go through `matmul_conv1x1`."""
    if tuple(stride) != (1, 1) or not x.is_contiguous():
        return matmul_conv1x1(x, weight2d.unsqueeze(0), None if bias is None else bias.unsqueeze(0), stride)
    _, c_in, h, w = x.shape
    xm = x.view(c_in, h * w)
    y = torch.mm(weight2d, xm) if bias is None else torch.addmm(bias.unsqueeze(1), weight2d, xm)
    return y.view(1, -1, h, w)


def forward_one(op, x: Tensor) -> Tensor:
    """Batch-1 inference: the plain conv with the aggregated kernel, written into scratch."""
    plan = op.__dict__.get(PLAN)
    one = plan.run(op, x) if plan is not None else None
    if one is None:
        one = kernel_one(op, x)
    if one is not None:
        views, bias = one
        if op.pointwise:
            return pointwise_one(x, views.kernel2d, bias, op.stride)
        return F.conv2d(x, views.kernel, bias, op.stride, op.padding, op.dilation, op.groups)
    factors = op.kernel_factors(x)
    if factors is None:
        weight, bias = op.kernel(x)
        weight, bias = weight[0], None if bias is None else bias[0]
    else:
        coeff, param, bias, mix = factors
        shape = op.kernel_shape
        weight = make_kernels(mix, coeff, param, scratch(shape, 0, x)).view(shape)
        bias = None if bias is None else bias[0]
    if op.pointwise:
        return pointwise_one(x, weight.reshape(weight.shape[0], -1), bias, op.stride)
    return F.conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups)
