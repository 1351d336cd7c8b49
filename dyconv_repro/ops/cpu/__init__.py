"""The CPU backend: opt-in accelerations of the operators on CPU, registered with the engine's dispatch point.

    rules.py      the measured CPU path rules (loop vs fold, the native depthwise kernel)
    batch_one.py  batch-1 inference plans (scratch kernels, minimal-call routing, the native batch-1 call)
    stream.py     streamed per-sample kernels (regenerated chunk-wise, never kept)
    kernels.py    when a native kernel may run, and the autograd functions around the calls
    sum_pool.py   the structured SumPool on CPU
    scratch.py    reused per-thread kernel buffers
    native.py     build / load the C++ kernels (csrc/); `dyconv-native`

Importing this package registers `CpuBackend` for device type "cpu" (`dyconv_repro.ops` does on import).
Without it -- the package removed, or `DYCONV_CPU_BACKEND=0` -- the engine's default rules run on CPU too: the
same results, slower. `DYCONV_NATIVE=0` keeps the backend but leaves its C++ kernels out.
"""

from __future__ import annotations

from torch import Tensor

from dyconv_repro.ops.cpu import batch_one, kernels, native, rules, stream, sum_pool
from dyconv_repro.ops.engine.dispatch import Backend, ConvCall, register_backend, routing_input


class CpuBackend(Backend):
    device_type = "cpu"
    paths = {"depthwise": kernels.depthwise_conv2d}

    def forward(self, op, x: Tensor) -> Tensor | None:
        if batch_one.eligible(op, x):
            return batch_one.forward_one(op, x)
        if op.path == "stream" or (op.path == "auto" and stream.streams(op, x)):
            return stream.forward(op, routing_input(op, x))
        return None

    def select_path(self, call: ConvCall) -> str | None:
        return rules.select_path(call)

    def bank_mix(self, coeff: Tensor, bank2d: Tensor) -> Tensor | None:
        return kernels.bank_mix(coeff, bank2d)

    def sum_pool(self, pool, x: Tensor) -> Tensor | None:
        return sum_pool.sum_pool(pool, x)

    def mixconv_impl(self, op, x: Tensor) -> str | None:
        # one conv with zero-padded kernels: per-group launches and the concat dominate on CPU (dyconv-bench ops)
        return "fused"

    def status(self) -> str:
        """Whether the native kernels are in use (the Python paths of the backend run without them)."""
        return native.status()


register_backend(CpuBackend())
