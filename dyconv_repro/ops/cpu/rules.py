"""The CPU's path rules for per-sample convs, as measured on the project's 2-core CPU VM.

`scripts/time_dynamic_paths.py` produced the evidence (fwd+bwd against the static floor, per layer shape);
the operator and model pages under results/benchmarks/ show the effect. On this CPU one plain conv per
sample (`loop`) beats the folded grouped conv for big per-sample convs -- dense/grouped kernels with
>= LOOP_MIN_MACS multiply-adds a sample, depthwise convs on maps of >= LOOP_MIN_DW_PIXELS output pixels --
while small (CIFAR-size) convs are dominated by per-call overhead and keep the fold. Depthwise kernels on
channels_last fp32 input go to the native channels_last kernel when it is built.
"""

from __future__ import annotations

import torch

from dyconv_repro.ops.cpu.kernels import loaded, no_dispatch_mode
from dyconv_repro.ops.engine.dispatch import ConvCall, traced

LOOP_MIN_MACS = 50_000_000  # dense/grouped: per-sample conv work above which per-sample convs beat the fold
LOOP_MIN_DW_PIXELS = 1600  # depthwise: output map size (~40^2) above which per-sample convs beat the fold
LOOP_MIN_KERNEL = 1 << 18  # training: per-sample kernel entries from which the streamed path pays (stream.py)


def native_depthwise_available(call: ConvCall) -> bool:
    """The native channels_last depthwise kernel can run `call` (built, fp32, channels_last, no autocast...)."""
    kernel = loaded()
    return (call.depthwise and call.channels_last and call.dtype == torch.float32 and kernel is not None
            and hasattr(kernel, "depthwise_forward") and not torch.is_autocast_enabled("cpu")
            and not traced() and no_dispatch_mode())


def select_path(call: ConvCall) -> str:
    """fold / loop / depthwise for a non-pointwise per-sample conv on CPU."""
    if call.batch == 1:
        return "fold"  # = the plain conv with the aggregated kernel
    h_out, w_out = call.out_size
    if call.grouped_depthwise:  # any channel multiplier
        if native_depthwise_available(call):
            return "depthwise"
        return "loop" if h_out * w_out >= LOOP_MIN_DW_PIXELS else "fold"
    _, cin_g, kh, kw = call.kernel_shape
    macs = call.kernel_shape[0] * cin_g * kh * kw * h_out * w_out
    return "loop" if macs >= LOOP_MIN_MACS else "fold"
