"""Pieces every input-dependent operator shares: one per-sample kernel per input, one fast conv.

CondConv, DY-Conv, WeightNet and DyNet (fused) all reduce to: pooled input -> routing head ->
coefficients -> per-sample kernel W (B, C_out, C_in/g, k, k) (+ bias (B, C_out)) -> conv of each
sample with its own kernel. `dynamic_conv2d` runs that last step with the fastest exact path for
the regime (measured with scripts/time_dynamic_paths.py on the 2-thread CPU):

* ``fold``   : batch folded into conv groups, X -> (1, B*C_in, H, W), groups = B*g (any geometry).
               At batch 1 this *is* the plain conv with the aggregated kernel.
* ``matmul`` : 1x1 kernels with zero padding as a batched matmul (stride = subsampling first);
               keeps channels_last inputs channels_last. 2-5x faster than ``fold`` on CPU.
* ``loop``   : one plain conv per sample (unbind/cat). The reference for tests, and the faster path
               for big per-sample convs: dense/grouped k > 1 with >= 50M MACs per sample, depthwise
               on maps >= ~40^2. Measured fwd+bwd / static floor (scripts/time_dynamic_paths.py,
               dynamicconv, 2 threads, batch 32 | 64):
                 layer               fold          loop
                 3x3 64@56^2         1.09 | 1.34   1.16 | 1.09
                 3x3 128@28^2        1.18 | 1.32   1.32 | 1.26
                 3x3 256@14^2        2.29 | 2.41   2.05 | 1.82
                 3x3 512@7^2         6.10          4.52
                 dw3x3 144@56^2      2.21 | 2.27   1.08 | 0.87
                 dw3x3 192@28^2      1.54 | 2.04   1.72 | 1.07
                 dw3x3 576@14^2      2.22 | 2.29   2.34 | 2.85
                 3x3 16@32^2 (CIFAR) 1.31 | 1.30   7.05 | 3.69   <- small convs: per-sample calls are slow
                 3x3 32@16^2         1.43 | 1.40   6.02 | 2.93
                 3x3 64@8^2          2.12 | 2.13   4.95 | 3.46
* ``depthwise``: depthwise kernels (groups = C_in = C_out) on a channels_last CPU fp32 input, when the native
               kernels are built (csrc/depthwise.cpp): forward and both gradients with the channel axis
               innermost, one vectorized multiply-add per tap. aten has the per-sample depthwise conv only
               as the fold's grouped conv, and oneDNN runs that in NCHW, where a depthwise conv is 2-2.5x
               slower than in channels_last. Conv alone, fwd+bwd, batch 64, 2 threads (ms; interleaved):
                 layer            static NCHW  static CL   fold (NCHW)  loop (NCHW)  depthwise (CL)
                 dw3x3 576@14^2   53-60        30-40       44-60        68           41-47
                 dw3x3 144@56^2   343          167-218     339          263          170-187
               NCHW inputs keep fold/loop: converting them to channels_last and back cost more than it saved
               on 56^2 maps (dynamicconv 144@56^2: 407 ms vs 333 ms by loop).
* ``stream`` : ops whose kernel is a linear mix of parameters (`kernel_factors`: CondConv, DY-Conv,
               WeightNet) regenerate the per-sample kernels chunk by chunk into a reused per-thread
               scratch buffer, in forward and again in backward (hand-written mix gradients; the chunk
               runs as fold or loop by the rules above; dense weight gradients of the loop chunks as one
               im2col bmm). Autograd keeps only x and the coefficients. Why: on this CPU (a VM where a
               page fault costs ~2.6 us) every fresh multi-MB kernel tensor comes back as new pages --
               ResNet-18 layer4 at batch 32 is 300 MB of kernels a layer, ~300k faults a step -- and a
               fresh kernel made a batch-1 512@7^2 conv 4.6x slower (17 ms vs 3.7 ms). Auto picks it
               (CPU fp32, no autocast) whenever no gradient is needed, and in training for dense k > 1
               kernels of >= 2^18 entries a sample. fwd+bwd / floor, dynamicconv, batch 32, 1 thread:
                 layer          loop   stream      (weightnet: loop  stream)
                 3x3 256@14^2   1.59   1.25                    1.90  1.44
                 3x3 512@7^2    3.60   2.14                    4.72  2.51
               On small kernels it does not pay (CIFAR 3x3 16@32^2: fold 1.15, stream 1.71): there the
               grouped conv's own buffers, not the kernel, fault.
The bank mix W = coeff @ bank (CondConv, DY-Conv; kernels of >= NATIVE_MIX_MIN entries) runs as the native
one-pass mix where built (csrc/mix.cpp, about 2x MKL's skinny (B, 4) @ (4, n) product); so does the bank's
gradient coeff^T @ g (the same skinny shape), while coeff's gradient stays mm.
Native code is suspended inside `reference_forward`, so the references are aten only.
At batch 1 without gradients (inference) every op runs the plain conv with the aggregated kernel written
into scratch (`DynamicConvOp._forward_one`). CondConv, DY-Conv and WeightNet compute that kernel with the
fewest calls their math allows (`kernel_one`): the spatial sum as a (C,) vector, the routing as addmv calls
with GAP's 1/(H*W) and DY-Conv's 1/tau folded into alpha/beta, the mix as one mv (bank) or mul (rows) into
the layer's scratch through cached views (`OneViews`); where the native kernel is built (`native.py`,
csrc/batch_one.cpp) those steps are one C++ call (`native_kernel_one`), the aten calls stay as its reference
and fallback. Batch-1 latency is per-call overhead (3-12 us a
dispatcher call, ~3 us a view, ~2 us an nn.Module attribute lookup here), so the path is judged by the
fwd b1 column of `dyconv-bench ops` (results/benchmarks/ops_cpu.md) and the b1 latency of the model pages.
PW_B1: 1x1 layers run as a matmul at batch 1 too; oneDNN's 1x1 conv is slower there (us, 2 threads):
                 layer             F.conv2d   mm        layer             F.conv2d   mm
                 16->96 @112^2       4891   1015        192->64 @14^2        220     90
                 144->32 @28^2        267    133        576->160 @7^2        312    167
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from dyconv_repro.ops import native
from dyconv_repro.ops.base import ConvOp

PATHS = ("auto", "fold", "matmul", "loop", "depthwise", "stream")


class _GlobalAvgPool(torch.autograd.Function):
    """x.mean((2, 3)) whose backward returns a stride-0 *view* of grad / (H*W).

    Autograd's own MeanBackward divides the expanded gradient, which writes a full-size tensor and
    then costs another full pass to accumulate into x's gradient; on the memory-bound layers
    (1x1 projections, depthwise) that doubled the routing overhead. Here the division is on (B, C).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g):
        return _pooled_grad(g, ctx.shape).expand(ctx.shape)


def _pooled_grad(g: Tensor, shape) -> Tensor:
    """The (B, C, 1, 1) gradient of x for GAP's (B, C) output gradient `g` (broadcasts over H, W)."""
    b, c, h, w = shape
    return (g / (h * w)).reshape(b, c, 1, 1)


class _PoolTee(torch.autograd.Function):
    """(an alias of x, GAP(x)): the alias feeds the conv, the pooled (B, C) the routing.

    With plain `gap`, x has two gradients (conv and routing) that autograd sums into a fresh full-size
    tensor: an allocation and a pass per layer (~8 % of a depthwise 576@14^2 fwd+bwd at batch 64).
    Here the routing's (B, C) gradient is broadcast-added into the conv's gradient for x in place
    (when that gradient is a dense tensor and no graph is being built; otherwise out of place).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.view_as(x), x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx, g_x, g_pooled):
        if g_pooled is None:
            return g_x
        spread = _pooled_grad(g_pooled, ctx.shape)
        if g_x is None:
            return spread.expand(ctx.shape)
        if not torch.is_grad_enabled() and _dense(g_x):
            return g_x.add_(spread)
        return g_x + spread


def _dense(t: Tensor) -> bool:
    return t.dim() == 4 and not t.requires_grad and 0 not in t.stride() and nchw_or_channels_last(t)


def pool_tee(x: Tensor) -> Tensor:
    """x as an alias that carries GAP(x) (read back by `gap`), so the two gradients of x meet in place."""
    alias, pooled = _PoolTee.apply(x)
    alias._dyconv_pooled = pooled
    return alias


def gap(x: Tensor) -> Tensor:
    """Global average pooling to (B, C); memory-format agnostic; cheap backward. On an alias made by
    `pool_tee` it returns the pooled vector computed there."""
    pooled = getattr(x, "_dyconv_pooled", None)
    if pooled is not None:
        return pooled
    if torch.is_grad_enabled() and x.requires_grad:
        return _GlobalAvgPool.apply(x)
    return x.mean(dim=(2, 3))


def _native():
    """The native module, unless a reference computation suspended it (`native.suspended()`)."""
    return None if native.is_suspended() else native.get()


def _no_dispatch_mode() -> bool:
    """No TorchDispatchMode (FlopCounterMode, ...) is active: those must see the aten ops, not native calls."""
    return not torch._C._len_torch_dispatch_stack()


NATIVE_MIX_MIN = 1 << 13  # kernel entries a sample from which the native mix beats mm plus its Python call


def native_for(function: str, *tensors: Tensor):
    """The native module if its `function` may run on these tensors here: built and not suspended, CPU fp32
    inputs, no CPU autocast (aten would compute in the autocast dtype), no dispatch mode, not compiling."""
    kernel = _native()
    if (kernel is None or not hasattr(kernel, function)
            or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors)
            or torch.is_autocast_enabled("cpu") or not _no_dispatch_mode() or torch.compiler.is_compiling()):
        return None
    return kernel


def native_mix_ready(coeff: Tensor, bank2d: Tensor):
    """The native module if it can compute coeff @ bank2d here (`native_for`, a contiguous bank)."""
    return native_for("bank_mix_batch", coeff, bank2d) if bank2d.is_contiguous() else None


class _NativeBankMix(torch.autograd.Function):
    """coeff (B, K) @ bank (K, n) by the native one-pass mix (csrc/mix.cpp).

    The bank's gradient coeff^T @ g is the same kind of skinny product -- K outputs, each a mix of the B rows
    of g -- so it runs on the same kernel where it may (`native_mix_ready` again: a FlopCounterMode or a
    suspension around backward sees aten). MKL's (K, B) @ (B, n) was 2.5x slower (2 threads, B = 32, K = 4,
    n = 36864: 706 -> 280 us; in a ResNet-20 training step, with g fresh from the conv's backward, 1.09 ms
    a 64-channel layer). coeff's gradient g @ bank^T stays mm (257 us there: MKL does well on it). Both in one
    native pass over g measured no faster (657 vs 617 us for the two calls at n = 36864).
    """

    @staticmethod
    def forward(ctx, coeff, bank2d, kernel):
        coeff = coeff.contiguous()
        out = coeff.new_empty(coeff.shape[0], bank2d.shape[1])
        kernel.bank_mix_batch(coeff, bank2d, out)
        ctx.save_for_backward(coeff, bank2d)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        coeff, bank2d = ctx.saved_tensors
        gcoeff = torch.mm(g, bank2d.t()) if ctx.needs_input_grad[0] else None
        gbank = None
        if ctx.needs_input_grad[1]:
            coeff_t = coeff.t().contiguous()
            kernel = native_mix_ready(coeff_t, g)
            if kernel is None:
                gbank = torch.mm(coeff_t, g)
            else:
                gbank = g.new_empty(bank2d.shape)
                kernel.bank_mix_batch(coeff_t, g, gbank)
        return gcoeff, gbank, None


def aggregate(coeff: Tensor, bank: Tensor) -> Tensor:
    """Mix a bank of K tensors (K, *shape) with per-sample coefficients (B, K) -> (B, *shape)."""
    k = bank.shape[0]
    flat = bank.reshape(k, -1)
    kernel = native_mix_ready(coeff, flat) if flat.shape[1] >= NATIVE_MIX_MIN else None
    mixed = torch.mm(coeff, flat) if kernel is None else _NativeBankMix.apply(coeff, flat, kernel)
    return mixed.reshape(coeff.shape[0], *bank.shape[1:])


class MLPHead(nn.Sequential):
    """Linear -> ReLU -> Linear (an nn.Sequential: same state_dict keys) that runs its three children
    as functional calls: at batch 1 the routing is a handful of microsecond ops and three nested module
    calls were a third of it. Children with hooks (or swapped for other types) run the normal way."""

    def linears(self) -> tuple[nn.Linear, nn.Linear] | None:
        """(fc1, fc2) when the children are a plain Linear, ReLU, Linear (so functional calls may replace
        them); None when one was hooked or swapped."""
        fc1, act, fc2 = self._modules.values()
        if plain(fc1, nn.Linear) and plain(act, nn.ReLU) and plain(fc2, nn.Linear):
            return fc1, fc2
        return None

    def forward(self, z: Tensor) -> Tensor:
        fcs = self.linears()
        if fcs is not None:
            fc1, fc2 = fcs
            return F.linear(torch.relu(F.linear(z, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        return super().forward(z)

    def forward_one(self, z: Tensor, in_scale: float, out_scale: float = 1.0) -> Tensor:
        """out_scale * self(in_scale * z) for one pooled vector z (C,), as two addmv calls (scales folded in)."""
        fcs = self.linears()
        if fcs is not None:
            fc1, fc2 = fcs
            hidden = affine_vec(z, fc1, alpha=in_scale).relu_()
            return affine_vec(hidden, fc2, alpha=out_scale, beta=out_scale)
        return self(z * in_scale) * out_scale


def affine_vec(z: Tensor, linear: nn.Linear, alpha: float = 1.0, beta: float = 1.0) -> Tensor:
    """alpha * (W @ z) + beta * b for one vector z as one addmv: the batch-1 routing folds GAP's 1/(H*W) and
    DY-Conv's 1/tau into alpha/beta instead of spending a call (3-12 us on a 2-core VM) on each, and W is used
    as stored (no transpose view). Reads `_parameters` directly (nn.Module.__getattr__ costs ~2 us)."""
    params = linear._parameters
    weight, bias = params["weight"], params.get("bias")
    if bias is None:
        return torch.mv(weight, z).mul_(alpha)
    return torch.addmv(bias, weight, z, beta=beta, alpha=alpha)


def plain(module: nn.Module, *types) -> bool:
    """`module` is exactly one of `types` and has no forward hooks (so a functional call may replace it)."""
    return type(module) in types and not (module._forward_hooks or module._forward_pre_hooks)


def inv_area(x: Tensor) -> float:
    """1 / (H*W) of x: GAP's division, folded into the first routing layer's alpha at batch 1."""
    h, w = x.shape[-2:]
    return 1.0 / (h * w)


def spatial_sum_one(x: Tensor) -> tuple[Tensor, float]:
    """Batch 1: (x summed over N, H, W as a (C,) vector, 1 / (H*W)) -- GAP with the division left to the
    next addmv; any memory format."""
    return x.sum((0, 2, 3)), inv_area(x)


class OneViews:
    """What the batch-1 path of one layer reuses call after call: its parameter as the 2-D operand of the
    mix (`src`), the layer's scratch kernel as the mix's `out`, and that kernel as the conv sees it
    (`kernel`, and `kernel2d` = (C_out, rest) for the 1x1 matmul). A view costs ~3 us a call on this VM;
    a small layer's whole batch-1 overhead is ~60 us. Rebuilt whenever the parameter's storage, the
    thread (scratch is per thread) or inference mode changes."""

    __slots__ = ("key", "param", "src", "out", "kernel", "kernel2d")

    def __init__(self, key, param: Tensor, src: Tensor, out: Tensor, kernel: Tensor):
        self.key, self.param, self.src, self.out, self.kernel = key, param, src, out, kernel
        self.kernel2d = kernel.view(kernel.shape[0], -1)


def one_views(op: nn.Module, param: Tensor, rows: int, bank: bool) -> OneViews:
    """The cached `OneViews` of `op` for `param` viewed as `rows` rows: a bank (K rows; the mix is
    `mv(src, coeff)`, src = (n, K)) or row-scaled (`rows` rows of the flat kernel; the mix is
    `mul(src, coeff)` with src = (entries, rows), i.e. each kernel row scaled by its coefficient)."""
    key = (threading.get_ident(), torch.is_inference_mode_enabled(), param.data_ptr())
    views = op.__dict__.get("_one_views")
    if views is not None and views.key == key and views.param is param:
        return views
    shape = op.kernel_shape
    flat = _scratch(shape, 0, param)[0]
    src = param.reshape(rows, -1).t()
    out = flat if bank else flat.view(rows, -1).t()
    views = OneViews(key, param, src, out, flat.view(shape))
    op.__dict__["_one_views"] = views  # not a module attribute: never in state_dict, dropped by deepcopy users
    return views


def bank_kernel_one(op: nn.Module, coeff: Tensor):
    """Batch-1 kernel (and bias) of an op whose `weight` / `bias` are banks of K kernels / biases:
    W = sum_k coeff[k] W_k written into the layer's scratch by one mv."""
    params = op._parameters
    bank, bias = params["weight"], params.get("bias")
    views = one_views(op, bank, bank.shape[0], bank=True)
    torch.mv(views.src, coeff, out=views.out)
    return views, None if bias is None else torch.mv(bias.t(), coeff)


ACT_NONE, ACT_RELU, ACT_SIGMOID, ACT_SOFTMAX = 0, 1, 2, 3  # activation codes of the native batch-1 kernel


def native_kernel_one(op: nn.Module, source: Tensor, pool: bool, layers, inner: int, final: int, param: Tensor,
                      bank: bool, bias_bank: Tensor | None = None, bias: Tensor | None = None):
    """The batch-1 kernel (`OneViews`, bias) by the native kernel in one call, or None when it is not
    available (the caller then runs the same math as aten calls). `source` is x when `pool` (the spatial
    sum is taken there), else the routing input vector; `layers` are (linear, alpha, beta) routing layers
    (z <- alpha * W z + beta * b) with `inner` between them and `final` after the last; the coefficients mix
    `param` as a bank of K kernels (`bank`) or scale its rows (WeightNet). The bias is `bias_bank` mixed the
    same way, else `bias` as given. The call is kept as the op's `NativeOnePlan`, which later calls reuse."""
    kernel = _native()
    if kernel is None or not nchw_or_channels_last(source) or not _no_dispatch_mode():
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
    plan = op.__dict__["_one_plan"] = NativeOnePlan(op, kernel, call, source if pool else None, views,
                                                    None if bias_bank is not None else bias)
    return plan.run_on(source)


class NativeOnePlan:
    """A layer's native batch-1 call with its arguments converted once (`BatchOnePlan`), and what they were
    derived from, so that later calls skip the op's Python routing code (~15-18 us a layer) and the argument
    conversion (~5 us): ResNet-20's batch-1 latency went down 3-4.5 % (A/B, median of 30 rounds, 2 threads).

    `run(op, x)` returns None, and the op takes its normal path (which builds a new plan), whenever a
    derived value may differ: another thread or inference mode (the scratch views), input shape (1/(H*W)),
    the op's `_one_state()` (DY-Conv's 1/tau), native code suspended or swapped, a dispatch mode active, the
    parameter's storage, any parameter, buffer or submodule of the op replaced, or a hook added inside it."""

    __slots__ = ("thread", "inference", "shape", "state", "native", "call", "views", "bias", "param", "param_ptr",
                 "deps", "hooks", "slot")

    def __init__(self, op: nn.Module, native_module, call, x: Tensor | None, views: OneViews, bias: Tensor | None):
        self.thread, self.inference = threading.get_ident(), torch.is_inference_mode_enabled()
        self.shape = None if x is None else x.shape  # pooling plans: the input shape (1/(H*W) is an alpha)
        self.state = op._one_state()
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
                or _native() is not self.native or not _no_dispatch_mode() or op._one_state() != self.state
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


def mlp_head(in_features: int, out_features: int, hidden: int | None = None, bias: bool = True) -> nn.Module:
    """Routing head on pooled features: Linear, or Linear -> ReLU -> Linear when `hidden` is given."""
    if not hidden:
        return nn.Linear(in_features, out_features, bias=bias)
    return MLPHead(nn.Linear(in_features, hidden, bias=bias), nn.ReLU(inplace=True),
                   nn.Linear(hidden, out_features, bias=bias))


def init_conv_bank_(bank: Tensor, bias_bank: Tensor | None = None) -> None:
    """Initialize each of the K leading slices like nn.Conv2d initializes its weight/bias (independently)."""
    for i in range(bank.shape[0]):
        nn.init.kaiming_uniform_(bank[i], a=math.sqrt(5))
    if bias_bank is not None:
        fan_in = bank[0].numel() // bank.shape[1]
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias_bank, -bound, bound)


def _is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def nchw_or_channels_last(x: Tensor) -> bool:
    """x is contiguous in one of the two layouts the native kernels read."""
    return x.is_contiguous() or _is_channels_last(x)


LOOP_MIN_KERNEL = 1 << 18  # training: per-sample kernel entries from which the streamed path pays off
LOOP_MIN_MACS = 50_000_000  # dense/grouped: per-sample conv work above which per-sample convs beat the fold
LOOP_MIN_DW_PIXELS = 1600     # depthwise: output map size (~40^2) above which per-sample convs beat the fold


def is_pointwise(kernel_size, padding, groups: int) -> bool:
    """1x1, no padding, one group: the per-sample conv is a (batched) matmul at every batch size."""
    return tuple(kernel_size) == (1, 1) and tuple(padding) == (0, 0) and groups == 1


def is_depthwise(x: Tensor, weight: Tensor, groups: int) -> bool:
    """One input channel per group, one output channel per input channel (no channel multiplier)."""
    return groups > 1 and groups == x.shape[1] == weight.shape[1] and weight.shape[2] == 1


def native_depthwise_ready(x: Tensor, weight: Tensor):
    """The native module if its channels_last depthwise kernel can run this call (`native_for`, x channels_last)."""
    return native_for("depthwise_forward", x, weight) if _is_channels_last(x) else None


def select_path(x: Tensor, weight: Tensor, stride, padding, groups: int) -> str:
    """The fast path for this regime (see module docstring for the measurements behind it)."""
    b = x.shape[0]
    if is_pointwise(weight.shape[-2:], padding, groups):
        return "matmul"  # also at batch 1: mm beats oneDNN's 1x1 conv there (PW_B1 in the module docstring)
    if b == 1:
        return "fold"  # = the plain conv with the aggregated kernel
    kh, kw = weight.shape[-2:]
    h_out = (x.shape[-2] + 2 * padding[0] - kh) // stride[0] + 1
    w_out = (x.shape[-1] + 2 * padding[1] - kw) // stride[1] + 1
    if groups > 1 and groups == x.shape[1] and weight.shape[2] == 1:  # depthwise, any channel multiplier
        if is_depthwise(x, weight, groups) and native_depthwise_ready(x, weight) is not None:
            return "depthwise"
        return "loop" if h_out * w_out >= LOOP_MIN_DW_PIXELS else "fold"
    macs = weight[0].numel() * h_out * w_out
    return "loop" if macs >= LOOP_MIN_MACS else "fold"


def fold_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """Per-sample kernels as one grouped conv with the batch folded into the groups."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[1]
    y = F.conv2d(x.reshape(1, b * c_in, h, w), weight.reshape(b * c_out, *weight.shape[2:]),
                 None if bias is None else bias.reshape(-1), stride, padding, dilation, b * groups)
    return y.reshape(b, c_out, y.shape[-2], y.shape[-1])


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient dense.

    `y.sum().backward()` (and similar) hands back a stride-0 expanded gradient, which sends CPU bmm
    to a per-batch copy loop (~10x slower); a conv makes its grad contiguous itself, bmm does not.
    """

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def matmul_conv1x1(x: Tensor, weight: Tensor, bias: Tensor | None, stride) -> Tensor:
    """1x1, zero-padding, groups=1 per-sample conv as a batched matmul; output keeps x's memory format."""
    sh, sw = stride
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, c_in, h, w = x.shape
    wmat = weight.reshape(b, weight.shape[1], c_in)
    if _is_channels_last(x):
        xm = x.permute(0, 2, 3, 1).reshape(b, h * w, c_in)
        if bias is None:
            y = torch.bmm(xm, wmat.transpose(1, 2))
        else:
            y = torch.baddbmm(bias.unsqueeze(1), xm, wmat.transpose(1, 2))
        if y.requires_grad:
            y = _DenseGrad.apply(y)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    xm = x.reshape(b, c_in, h * w)
    y = torch.bmm(wmat, xm) if bias is None else torch.baddbmm(bias.unsqueeze(2), wmat, xm)
    if y.requires_grad:
        y = _DenseGrad.apply(y)
    return y.reshape(b, -1, h, w)


def pointwise_one(x: Tensor, weight2d: Tensor, bias: Tensor | None, stride) -> Tensor:
    """Batch-1 1x1 conv (zero padding, groups=1) as one mm on the (C_in, H*W) view of a contiguous x;
    other memory formats / strides go through `matmul_conv1x1`."""
    if tuple(stride) != (1, 1) or not x.is_contiguous():
        return matmul_conv1x1(x, weight2d.unsqueeze(0), None if bias is None else bias.unsqueeze(0), stride)
    _, c_in, h, w = x.shape
    xm = x.view(c_in, h * w)
    y = torch.mm(weight2d, xm) if bias is None else torch.addmm(bias.unsqueeze(1), weight2d, xm)
    return y.view(1, -1, h, w)


def loop_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int) -> Tensor:
    """One plain conv per sample: the reference, and (unbind/stack, no per-slice zero-filled
    gradients) a competitive path where plain convs beat the folded grouped conv."""
    biases = [None] * x.shape[0] if bias is None else bias.unbind(0)
    outs = [F.conv2d(xi.unsqueeze(0), wi, bi, stride, padding, dilation, groups)
            for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), biases)]
    return torch.cat(outs, 0)


class _NativeDepthwise(torch.autograd.Function):
    """Per-sample depthwise conv by the native channels_last kernel (csrc/depthwise.cpp), with its gradients."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, kernel):
        b, c, _, kh, kw = weight.shape
        kernels = weight.reshape(b, c, kh * kw).transpose(1, 2).contiguous()  # (B, taps, C): channels innermost
        ctx.save_for_backward(x, kernels)
        ctx.geometry, ctx.has_bias, ctx.kernel = (kh, kw, stride, padding, dilation), bias is not None, kernel
        return kernel.depthwise_forward(x, kernels, bias, kh, kw, stride, padding, dilation)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, kernels = ctx.saved_tensors
        kh, kw, stride, padding, dilation = ctx.geometry
        kernel = ctx.kernel
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = kernel.depthwise_input_grad(gy, kernels, x.shape[2], x.shape[3], kh, kw, stride, padding, dilation)
        if ctx.needs_input_grad[1]:
            gw = kernel.depthwise_kernel_grad(gy, x, kh, kw, stride, padding, dilation)
            gw = gw.transpose(1, 2).reshape(x.shape[0], x.shape[1], 1, kh, kw)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((2, 3))
        return gx, gw, gb, None, None, None, None


def native_depthwise_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation) -> Tensor:
    """Per-sample depthwise conv of a channels_last x with weight (B, C, 1, kh, kw); output channels_last."""
    kernel = native_depthwise_ready(x, weight) if is_depthwise(x, weight, x.shape[1]) else None
    if kernel is None:
        raise ValueError("the depthwise path needs a depthwise kernel (B, C, 1, kh, kw), a channels_last float32 CPU "
                         f"input and the native kernels built (`dyconv-native`; now: {native.status()})")
    return _NativeDepthwise.apply(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), kernel)


def dynamic_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                   path: str = "auto") -> Tensor:
    """Convolve sample i of x with weight[i] (+ bias[i]); `path` forces an implementation (tests)."""
    if path == "auto":
        path = select_path(x, weight, stride, padding, groups)
    if path == "matmul":
        if weight.shape[-2:] != (1, 1) or tuple(padding) != (0, 0) or groups != 1:
            raise ValueError("the matmul path needs a 1x1 kernel, zero padding and groups=1")
        return matmul_conv1x1(x, weight, bias, stride)
    if path == "fold":
        return fold_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if path == "loop":
        return loop_conv2d(x, weight, bias, stride, padding, dilation, groups)
    if path == "depthwise":
        if groups != x.shape[1]:
            raise ValueError(f"the depthwise path needs groups == in_channels ({x.shape[1]}), got {groups}")
        return native_depthwise_conv2d(x, weight, bias, stride, padding, dilation)
    if path == "stream":
        raise ValueError("the stream path generates the kernels itself: it needs an op with kernel_factors()")
    raise ValueError(f"unknown dynamic conv path {path!r}; valid: {', '.join(PATHS)}")


# ----------------------------------------------------------------------------- streamed kernels
# The per-sample kernels of a big layer (ResNet-18 layer4: 2.4M entries a sample, 300 MB at batch 32)
# cost more than the conv itself on CPU: autograd keeps them for backward, and every fresh block above
# glibc's mmap threshold comes back as new pages (~2.6 us a page fault on this VM). The streamed path
# never materializes them: the kernel is a *linear* mix of parameters (`BankMix`, `RowMix`), so it is
# regenerated chunk by chunk into a reused per-thread scratch buffer, in forward and again in backward,
# where the mix's own gradients are written out by hand. Autograd saves only x and the coefficients.

STREAM_CHUNK_ELEMS = 1 << 23  # kernel entries generated at once (32 MB fp32 scratch, two buffers) ...
STREAM_MIN_CHUNK = 8  # ... but at least this many samples: MKL's (c, K) @ (K, n) mix costs 4.2 ms a sample at
                      # c = 3 and 2.0 ms at c >= 8 (n = 512*512*9, K = 4, 2 threads); 512@7^2 b32 fwd+bwd 1044 -> 754 ms


def stream_chunk(batch: int, n: int) -> int:
    """Samples whose kernels (n entries each) the streamed path generates at once."""
    return max(1, min(batch, max(STREAM_MIN_CHUNK, STREAM_CHUNK_ELEMS // n)))

_SCRATCH = threading.local()


def _scratch(name, numel: int, like: Tensor) -> Tensor:
    """A reused flat buffer of `numel` elements (per thread, device and dtype); contents undefined.

    A tuple `name` is a kernel shape: a (1, prod(shape)) buffer of exactly that size (batch-1 path).
    """
    try:
        store = _SCRATCH.buffers
    except AttributeError:
        store = _SCRATCH.buffers = {}
    # inference tensors cannot be written outside inference mode: keep one set per mode
    key = (name, like.dtype, like.device.type, torch.is_inference_mode_enabled())
    buf = store.get(key)
    if isinstance(name, tuple):
        if buf is None:
            buf = store[key] = torch.empty(1, math.prod(name), dtype=like.dtype, device=like.device)
        return buf
    if buf is None or buf.numel() < numel:
        buf = store[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


class BankMix:
    """W = coeff @ bank: coeff (B, K), bank (K, *kernel shape) -- CondConv / DY-Conv."""

    @staticmethod
    def make(coeff: Tensor, param: Tensor, out: Tensor) -> Tensor:
        flat = param.reshape(param.shape[0], -1)
        kernel = native_mix_ready(coeff, flat)
        if kernel is None:
            return torch.mm(coeff, flat, out=out)
        kernel.bank_mix_batch(coeff.contiguous(), flat, out)
        return out

    @staticmethod
    def backward(coeff: Tensor, param: Tensor, gw: Tensor, gparam: Tensor) -> Tensor:
        """Accumulate d(param) into `gparam` (flat (K, n)); return d(coeff)."""
        flat = param.reshape(param.shape[0], -1)
        gparam.addmm_(coeff.t(), gw)
        return torch.mm(gw, flat.t())


class RowMix:
    """W[b, r, e] = sum_m coeff[b, r, m] * param[r, e, m] -- WeightNet's grouped fc2."""

    @staticmethod
    def make(coeff: Tensor, param: Tensor, out: Tensor) -> Tensor:
        b, (r, e, m) = coeff.shape[0], param.shape
        if m == 1:
            return torch.mul(coeff, param.reshape(r, e), out=out.view(b, r, e)).view(b, -1)
        return out.copy_(torch.einsum("brm,rem->bre", coeff, param).reshape(b, -1))

    @staticmethod
    def backward(coeff: Tensor, param: Tensor, gw: Tensor, gparam: Tensor) -> Tensor:
        b, (r, e, _) = coeff.shape[0], param.shape
        gw = gw.view(b, r, e)
        gparam.add_(torch.einsum("bre,brm->rem", gw, coeff).reshape(gparam.shape))
        return torch.einsum("bre,rem->brm", gw, param)


class _StreamedConv(torch.autograd.Function):
    """Per-sample conv whose kernels `mix.make(coeff, param)` are regenerated chunk-wise, never stored."""

    @staticmethod
    def forward(ctx, x, coeff, param, bias, mix, wshape, geometry):
        ctx.save_for_backward(x, coeff, param)
        ctx.mix, ctx.wshape, ctx.geometry, ctx.has_bias = mix, wshape, geometry, bias is not None
        return streamed_forward(x, coeff, param, bias, mix, wshape, geometry, grad=True)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, coeff, param = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        mix, wshape = ctx.mix, ctx.wshape
        b, n = x.shape[0], math.prod(wshape)
        chunk = stream_chunk(b, n)
        gy = gy.contiguous()
        need_x = ctx.needs_input_grad[0]
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else None
        gcoeff = torch.empty_like(coeff)
        gparam = torch.zeros(param.shape[0], param.numel() // param.shape[0], dtype=param.dtype, device=param.device)
        geo = (stride, padding, dilation, False, (0, 0), groups)
        for s in range(0, b, chunk):
            c = min(chunk, b - s)
            w = mix.make(coeff[s:s + c], param, _scratch("w", c * n, x).view(c, n)).view(c, *wshape)
            gw = _scratch("gw", c * n, x).view(c, *wshape)
            xs, gys = x[s:s + c], gy[s:s + c]
            if _chunk_path(xs, w, stride, padding, groups) == "fold":  # the chunk as one grouped conv
                gxf, gwf, _ = torch.ops.aten.convolution_backward(
                    gys.reshape(1, -1, *gys.shape[2:]), xs.reshape(1, -1, *xs.shape[2:]), w.reshape(-1, *wshape[1:]),
                    None, stride, padding, dilation, False, (0, 0), c * groups, (need_x, True, False))
                if need_x:
                    gx[s:s + c] = gxf.view_as(xs)
                gw.view(-1).copy_(gwf.reshape(-1))
            else:  # one conv per sample; dense weight gradients as one batched matmul over im2col columns
                if groups == 1:
                    cols = F.unfold(xs, wshape[-2:], dilation, padding, stride)
                    torch.bmm(gys.reshape(c, wshape[0], -1), cols.transpose(1, 2), out=gw.view(c, wshape[0], -1))
                for i in range(c):
                    gxi, gwi, _ = torch.ops.aten.convolution_backward(
                        gys[i:i + 1], xs[i:i + 1], w[i], None, *geo, (need_x, groups != 1, False))
                    if need_x:
                        gx[s + i].copy_(gxi[0])
                    if groups != 1:
                        gw[i].copy_(gwi)
            gcoeff[s:s + c] = mix.backward(coeff[s:s + c], param, gw.view(c, n), gparam)
        gbias = gy.sum((2, 3)) if ctx.has_bias else None
        return gx, gcoeff, gparam.view_as(param), gbias, None, None, None


def _chunk_path(x: Tensor, weight: Tensor, stride, padding, groups: int) -> str:
    """fold or loop for one chunk of the streamed path (1x1 kernels run as the fold's grouped conv)."""
    return "loop" if select_path(x, weight, stride, padding, groups) == "loop" else "fold"


def streamed_forward(x: Tensor, coeff: Tensor, param: Tensor, bias: Tensor | None, mix, wshape, geometry,
                     path: str = "auto", grad: bool = False) -> Tensor:
    """Per-sample conv with the kernels generated chunk-wise into scratch (no autograd through them)."""
    b, n = x.shape[0], math.prod(wshape)
    chunk = stream_chunk(b, n)
    outs = []
    with torch.no_grad():
        for s in range(0, b, chunk):
            c = min(chunk, b - s)
            w = mix.make(coeff[s:s + c], param, _scratch("w", c * n, x).view(c, n)).view(c, *wshape)
            xs = x[s:s + c]
            p = path if path != "auto" else (_chunk_path(xs, w, *geometry[:2], geometry[3]) if grad else "auto")
            outs.append(dynamic_conv2d(xs, w, None if bias is None else bias[s:s + c], *geometry, p))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def streamed_conv2d(x: Tensor, coeff: Tensor, param: Tensor, bias: Tensor | None, mix, wshape, stride, padding,
                    dilation, groups: int) -> Tensor:
    """Per-sample conv with kernels W[i] = mix.make(coeff[i], param), differentiable, never materialized."""
    geometry = (tuple(stride), tuple(padding), tuple(dilation), int(groups))
    if torch.is_grad_enabled() and (x.requires_grad or coeff.requires_grad or param.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _StreamedConv.apply(x, coeff, param, bias, mix, tuple(wshape), geometry)
    return streamed_forward(x, coeff, param, bias, mix, tuple(wshape), geometry)


class DynamicConvOp(ConvOp):
    """Base of the per-sample-kernel operators: subclasses implement `kernel(x) -> (weight, bias)`.

    Routing input: GAP of the layer input by default; when block routing is wired
    (`dyconv_repro.ops.routing`), the enclosing block's hook puts the shared routing input in
    `self._slot.value` and the op reads it instead. `path` forces an implementation (tests, benchmarks).
    """

    path: str = "auto"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = None
        self.pointwise = is_pointwise(self.kernel_size, self.padding, self.groups)

    @property
    def block_routed(self) -> bool:
        return self._slot is not None

    def block_input(self) -> Tensor:
        """The routing input handed over by the enclosing block (block routing only)."""
        value = self._slot.value
        if value is None:
            raise RuntimeError(f"{type(self).__name__} is wired for block routing but its block's hook did not "
                               "run: call the enclosing block, not the op alone")
        return value

    def kernel(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def kernel_factors(self, x: Tensor):
        """(coeff, param, bias, mix): the same kernels as `kernel(x)`, as W = mix.make(coeff, param)
        (see `BankMix`, `RowMix`); None where the op's kernel is not such a mix (no streamed path)."""
        return None

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def _streams(self, x: Tensor) -> bool:
        """Auto choice of the streamed path: CPU fp32 only; always when no gradient is needed (the kernel
        goes to scratch instead of a fresh allocation), in training only for big dense k > 1 kernels."""
        if (x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32
                or torch.compiler.is_compiling()):
            return False
        if type(self).kernel_factors is DynamicConvOp.kernel_factors:
            return False
        if not torch.is_grad_enabled() or x.shape[0] == 1 and not self.training:
            return not torch.is_grad_enabled()
        co, ci, kh, kw = self.kernel_shape
        return self.groups == 1 and kh * kw > 1 and co * ci * kh * kw >= LOOP_MIN_KERNEL and x.shape[0] > 1

    def _one_state(self):
        """The op's own value (besides its parameters and input shape) that its batch-1 routing depends on;
        a change makes the cached `NativeOnePlan` stale."""
        return None

    def kernel_one(self, x: Tensor):
        """Batch-1 inference: (`OneViews` holding this sample's kernel in `kernel`/`kernel2d`, bias or None),
        computed with the fewest calls the op's math allows; None where the op has no such path (the
        generic one below runs instead). Batch-1 latency is per-call overhead, not arithmetic."""
        return None

    def _forward_one(self, x: Tensor) -> Tensor:
        """Batch-1 inference: the plain conv with the aggregated kernel, written into scratch (a fresh
        kernel each call made the allocator hand back new pages, 3-4x the conv's time on big layers)."""
        plan = self.__dict__.get("_one_plan")
        one = plan.run(self, x) if plan is not None else None
        if one is None:
            one = self.kernel_one(x)
        if one is not None:
            views, bias = one
            if self.pointwise:
                return pointwise_one(x, views.kernel2d, bias, self.stride)
            return F.conv2d(x, views.kernel, bias, self.stride, self.padding, self.dilation, self.groups)
        factors = self.kernel_factors(x)
        if factors is None:
            weight, bias = self.kernel(x)
            weight, bias = weight[0], None if bias is None else bias[0]
        else:
            coeff, param, bias, mix = factors
            shape = self.kernel_shape
            weight = mix.make(coeff, param, _scratch(shape, 0, x)).view(shape)
            bias = None if bias is None else bias[0]
        if self.pointwise:
            return pointwise_one(x, weight.reshape(weight.shape[0], -1), bias, self.stride)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def __getstate__(self):
        state = super().__getstate__()
        for cache in ("_one_views", "_tau_cache", "_one_plan"):  # scratch views, derived values: rebuilt on use
            state.pop(cache, None)
        return state

    def forward(self, x: Tensor) -> Tensor:
        path = self.path
        if (not torch.is_grad_enabled() and x.is_cpu and x.shape[0] == 1 and path in ("auto", "fold")
                and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return self._forward_one(x)
        if self._slot is None and x.requires_grad and torch.is_grad_enabled():
            x = pool_tee(x)
        if path == "stream" or (path == "auto" and self._streams(x)):
            factors = self.kernel_factors(x)
            if factors is None:
                raise ValueError(f"{type(self).__name__} has no streamed path (no kernel_factors)")
            coeff, param, bias, mix = factors
            return streamed_conv2d(x, coeff, param, bias, mix, self.kernel_shape, self.stride, self.padding,
                                   self.dilation, self.groups)
        weight, bias = self.kernel(x)
        return dynamic_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups, path)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: the same per-sample kernels (aten only) applied one sample at a time."""
        with native.suspended():
            weight, bias = self.kernel(x)
        return loop_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    # --- block routing protocol (see dyconv_repro/ops/routing.py) ---
    @classmethod
    def block_head(cls, in_features: int, ops: list) -> nn.Module:  # pragma: no cover - abstract
        """The module that turns the pooled block input into one routing input per op."""
        raise NotImplementedError

    def attach_block_routing(self, slot, in_features: int) -> None:
        """Read the routing input from `slot` (a tensor of `in_features` columns) from now on."""
        self._slot = slot
