"""The one dispatch point: how an operator's per-sample kernel is applied, keyed by device type.

Default rules (every device type): a 1x1 / zero-padding / one-group kernel runs as a batched matmul, every other
kernel as the fold (batch folded into conv groups). No GPU measurement is in the repo yet, so CUDA and every
other device without a backend use exactly these (`results/benchmarks/` holds the measurements behind each rule).

A **backend** is an opt-in acceleration for one device type (`Backend`; the CPU backend in `ops/cpu/` registers
itself when `dyconv_repro.ops` is imported). The dispatch point asks the backend registered for the input's device
type first; each hook may decline by returning None, and the default rule runs. No backend is consulted

- while the model is traced, compiled or exported (`traced()`): tracers must see plain aten calls;
- inside `backends_disabled()`: the per-sample references, so that fast == reference tests check a backend
  against code it does not share.

**Export form.** While the model is traced or exported (`exporting()`: `torch.jit.trace`, `torch.onnx.export`,
`torch.export`, or inside `export_mode()`) every per-sample conv takes the `export` path (patches + batched
matmul, depthwise as shifted multiply-adds: `paths.export_conv2d`) whatever its shape: no backend, no native call, no scratch buffer, no `out=`
write and no branch on the batch size, so that the exported graph takes any batch. Plain `torch.compile` is
not exporting: it keeps the default rules (its compiled training step was checked against eager in that form,
engine/compile_check.py), only without the backend.

Removing a backend package leaves a complete, correct library.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from dyconv_repro.ops.engine.paths import PATHS, export_conv2d, is_channels_last, is_pointwise
from dyconv_repro.ops.engine.pooling import pool_tee


class Backend:
    """Opt-in acceleration of the operators on one device type. Every hook returns None to decline."""

    device_type: str = ""
    paths: dict[str, Callable] = {}  # extra per-sample conv paths (name -> fn with the `paths.PATHS` signature)

    def forward(self, op, x: Tensor) -> Tensor | None:
        """The whole forward of a dynamic op (batch-1 plans, streamed kernels), or None."""
        return None

    def select_path(self, call: ConvCall) -> str | None:
        """The per-sample conv path for `call` (a name in `paths.PATHS` or `self.paths`), or None."""
        return None

    def bank_mix(self, coeff: Tensor, bank2d: Tensor) -> Tensor | None:
        """coeff (B, K) @ bank2d (K, n), differentiable, or None (torch.mm runs)."""
        return None

    def sum_pool(self, pool, x: Tensor) -> Tensor | None:
        """The structured SumPool of x, or None (`pool.box_sum` runs)."""
        return None

    def mixconv_impl(self, op, x: Tensor) -> str | None:
        """'split' or 'fused' for a MixConv call whose impl is 'auto', or None."""
        return None

    def status(self) -> str:
        """One line for logs and benchmark pages."""
        return "on"


class ThreadFlag:
    """A per-thread, nestable switch: true inside any `with flag.raised():` block of the current thread."""

    def __init__(self):
        self._local = threading.local()
        self._lock = threading.Lock()
        self._raised_anywhere = 0  # blocks open in any thread: the common all-clear costs no thread-local lookup

    @contextmanager
    def raised(self):
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        with self._lock:
            self._raised_anywhere += 1
        try:
            yield
        finally:
            self._local.depth = depth
            with self._lock:
                self._raised_anywhere -= 1

    def __bool__(self) -> bool:
        return self._raised_anywhere > 0 and getattr(self._local, "depth", 0) > 0


_BACKENDS: dict[str, Backend] = {}
_DISABLED = ThreadFlag()


def register_backend(backend: Backend) -> None:
    """Make `backend` the acceleration of its device type (replacing a previous one)."""
    _BACKENDS[backend.device_type] = backend


def registered_backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def backend_status(device_type: str) -> str:
    """The backend's own status line for `device_type`, or 'off (no backend)'."""
    backend = _BACKENDS.get(device_type)
    return "off (no backend)" if backend is None else backend.status()


def backends_disabled():
    """Within the block every op runs the default rules only (the references; tests of the bare library)."""
    return _DISABLED.raised()


_EXPORT = ThreadFlag()


def _onnx_export_probe() -> Callable[[], bool]:
    """torch.onnx.is_in_onnx_export without its two imports a call (2 us, on every dynamic layer's dispatch):
    the flags it reads, bound once; the public function where torch moved them."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


_in_onnx_export = _onnx_export_probe()


def export_mode():
    """Within the block the ops run their export form (`exporting()` is true) without a tracer: what a
    traced or exported graph computes, in eager mode (equivalence tests, the export benchmark)."""
    return _EXPORT.raised()


def exporting() -> bool:
    """The model is being traced or exported (torch.jit.trace, torch.onnx.export, torch.export) or runs inside
    `export_mode()`: the one test of whether the export form runs (see the module docstring)."""
    if torch.compiler.is_exporting():
        return True
    if torch.compiler.is_compiling():
        return False  # plain torch.compile keeps the default rules (and dynamo meets none of the probes below)
    return torch._C._is_tracing() or _in_onnx_export() or bool(_EXPORT)


def traced() -> bool:
    """Exporting or compiling: only plain, traceable aten calls may run (no backend, no native code)."""
    return exporting() or torch.compiler.is_compiling()


def backend_for(x: Tensor) -> Backend | None:
    """The backend for x's device type, or None (none registered, disabled, exporting or compiling)."""
    return _backend_for_type(x.device.type)


def _backend_for_type(device_type: str) -> Backend | None:
    backend = _BACKENDS.get(device_type)
    if backend is None or traced() or _DISABLED:
        return None
    return backend


@dataclass(frozen=True)
class ConvCall:
    """What a path choice may depend on: the device type, the input's shape, layout and dtype, the kernel."""

    device_type: str
    batch: int
    in_channels: int
    in_size: tuple[int, int]
    kernel_shape: tuple[int, int, int, int]  # (C_out, C_in / groups, kh, kw) of one sample
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    channels_last: bool = False
    dtype: torch.dtype = torch.float32

    @classmethod
    def of(cls, x: Tensor, weight: Tensor, stride, padding, dilation, groups: int) -> ConvCall:
        """The call of per-sample kernels `weight` (B, C_out, C_in/g, kh, kw) on x (B, C_in, H, W)."""
        return cls(x.device.type, x.shape[0], x.shape[1], tuple(x.shape[-2:]), tuple(weight.shape[1:]),
                   tuple(stride), tuple(padding), tuple(dilation), int(groups), is_channels_last(x), x.dtype)

    @property
    def out_size(self) -> tuple[int, int]:
        (h, w), (_, _, kh, kw) = self.in_size, self.kernel_shape
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, k, s in zip((h, w), self.padding, self.dilation, (kh, kw), self.stride))

    @property
    def pointwise(self) -> bool:
        return is_pointwise(self.kernel_shape[-2:], self.padding, self.groups)

    @property
    def grouped_depthwise(self) -> bool:
        """One input channel per group (any channel multiplier)."""
        return self.groups > 1 and self.groups == self.in_channels and self.kernel_shape[1] == 1

    @property
    def depthwise(self) -> bool:
        """Depthwise without a channel multiplier (C_out == C_in == groups)."""
        return self.grouped_depthwise and self.kernel_shape[0] == self.in_channels


def select_path(call: ConvCall) -> str:
    """The per-sample conv path for `call`: export while exporting, matmul for pointwise kernels, else the
    backend's choice or fold."""
    if exporting():
        return "export"
    if call.pointwise:
        return "matmul"
    backend = _backend_for_type(call.device_type)
    choice = None if backend is None else backend.select_path(call)
    return choice or "fold"


def available_paths(x: Tensor | None = None) -> list[str]:
    backend = None if x is None else backend_for(x)
    return ["auto", *PATHS, *(backend.paths if backend is not None else ()), "stream"]


def dynamic_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation, groups: int,
                   path: str = "auto", kernel_shape=None) -> Tensor:
    """Convolve sample i of x with weight[i] (+ bias[i]); `path` forces an implementation (tests, benchmarks).
    `kernel_shape`: one sample's kernel shape as Python ints, where the caller knows it (see `export_conv2d`)."""
    if exporting():  # one batch-symbolic path, whatever was forced (the others bake the batch into the graph)
        return export_conv2d(x, weight, bias, stride, padding, dilation, groups, kernel_shape)
    if path == "auto":
        path = select_path(ConvCall.of(x, weight, stride, padding, dilation, groups))
    fn = PATHS.get(path)
    if fn is None:
        backend = backend_for(x)
        fn = None if backend is None else backend.paths.get(path)
    if fn is None:
        if path == "stream":
            raise ValueError("the stream path generates the kernels itself: it needs an op with kernel_factors() "
                             "on a device whose backend streams (CPU)")
        raise ValueError(f"dynamic conv path {path!r} is not available for a {x.device.type} input here; valid: "
                         f"{', '.join(available_paths(x))}")
    y = fn(x, weight, bias, stride, padding, dilation, groups)
    if is_channels_last(x) and not y.is_contiguous(memory_format=torch.channels_last):
        # the fold reshapes x into one (1, B*C, H, W) image, which is NCHW: hand the next layer what it was given
        y = y.contiguous(memory_format=torch.channels_last)
    return y


def routing_input(op, x: Tensor) -> Tensor:
    """x, or (training, per-layer routing) an alias of x that carries GAP(x) so that the conv's and the routing's
    gradients of x meet in place (`pooling.pool_tee`)."""
    if op._slot is None and x.requires_grad and torch.is_grad_enabled() and not traced():
        return pool_tee(x)
    return x


def run(op, x: Tensor) -> Tensor:
    """The forward of a per-sample-kernel op: the backend's, else `op.kernel(x)` through `dynamic_conv2d`."""
    backend = backend_for(x)
    if backend is not None:
        y = backend.forward(op, x)
        if y is not None:
            return y
    if op.path == "stream" and not exporting():
        raise ValueError(f"{type(op).__name__}: the stream path is the CPU backend's (kernel_factors(), CPU fp32 "
                         "input); use path='auto'")
    x = routing_input(op, x)
    weight, bias = op.kernel(x)
    return dynamic_conv2d(x, weight, bias, op.stride, op.padding, op.dilation, op.groups, op.path, op.kernel_shape)


def bank_mix(coeff: Tensor, bank2d: Tensor) -> Tensor:
    """coeff (B, K) @ bank2d (K, n): the backend's mix where it has one, else torch.mm."""
    backend = backend_for(coeff)
    mixed = None if backend is None else backend.bank_mix(coeff, bank2d)
    return torch.mm(coeff, bank2d) if mixed is None else mixed


def sum_pool(pool, x: Tensor) -> Tensor:
    """A structured SumPool's forward: the backend's, else the device-agnostic `pool.box_sum`."""
    backend = backend_for(x)
    y = None if backend is None else backend.sum_pool(pool, x)
    return pool.box_sum(x) if y is None else y


def mixconv_impl(op, x: Tensor) -> str:
    """'fused' (one conv with zero-padded kernels) or 'split' (one conv per group) for a MixConv call: its forced
    impl, else the backend's choice; 'split' while exporting (plain convs; the fused kernel would be built in the
    graph) and by default: the paper's and timm's form (unmeasured on GPU: a project choice)."""
    if exporting():
        return "split"
    if op.impl != "auto":
        return op.impl
    if op.groups == 1:
        return "split"  # a fused dense conv would not be block-diagonal
    backend = backend_for(x)
    choice = None if backend is None else backend.mixconv_impl(op, x)
    return choice or "split"
