"""The trainer's device setup: memory format, cuDNN / TF32 switches, a loud CPU fallback, the dynamic-conv path.

Defaults are what a GPU user expects: cuDNN autotuning on and deterministic algorithms off (`trainer.deterministic
=true` restores bit-exactness), TF32 on for matmuls and convs alike (so the dynamic ops' matmuls and the static
convs run at the same precision; `trainer.tf32=false` for strict fp32).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.base import ConvOp
from dyconv_repro.ops.engine import DynamicConvOp
from dyconv_repro.ops.engine.dispatch import available_paths
from dyconv_repro.ops.structured import StructuredLinear, SumPool

log = logging.getLogger("dyconv")


def to_channels_last(model: nn.Module) -> nn.Module:
    """`model.to(memory_format=torch.channels_last)` for the 4-D tensors only: the dynamic ops' kernel banks are
    5-D (K, C_out, C_in/g, kh, kw), which `Module.to(memory_format=...)` refuses."""
    with torch.no_grad():
        for module in model.modules():
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
                        converted = t.contiguous(memory_format=torch.channels_last)
                        if isinstance(t, nn.Parameter):
                            t.data = converted
                        else:
                            store[name] = converted
    return model


def configure_cuda(deterministic: bool, cudnn_benchmark: bool, tf32: bool) -> dict:
    """Process-wide cuDNN / TF32 switches; returns what was set (for the run's summary)."""
    if deterministic:
        cudnn_benchmark = False
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
    torch.backends.cudnn.allow_tf32 = bool(tf32)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return {"deterministic": bool(deterministic), "cudnn_benchmark": bool(cudnn_benchmark), "tf32": bool(tf32)}


def gpu_present() -> bool:
    """An NVIDIA GPU is visible to the OS (whether or not this torch build can use it)."""
    return Path("/dev/nvidia0").exists() or Path("/proc/driver/nvidia/version").exists()


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available; a GPU this torch build cannot use is said loudly, never silently skipped."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if gpu_present():
            log.warning("a GPU is present but this torch build (%s) cannot use it (CUDA %s): training on CPU. "
                        "Install the CUDA build (README: GPU) or set trainer.device=cpu to silence this.",
                        torch.__version__, torch.version.cuda or "none")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = ("this torch build has no CUDA support" if torch.version.cuda is None
               else "no CUDA device is visible")
        raise UserError(f"trainer.device={name} but {why} (torch {torch.__version__}); install the CUDA build "
                        "(README: GPU) or use trainer.device=cpu")
    return dev


def set_dynamic_conv_path(model: nn.Module, path: str) -> int:
    """Force every dynamic op's per-sample conv path (`trainer.conv_path`; auto = the dispatch point decides)."""
    valid = [*available_paths(), "depthwise"]  # depthwise: the CPU backend's native path
    if path not in valid:
        raise UserError(f"trainer.conv_path must be one of {', '.join(valid)}, got {path!r}")
    ops = [m for m in model.modules() if isinstance(m, DynamicConvOp)]
    for m in ops:
        m.path = path
    return len(ops)


def constant_buffer_names(model: nn.Module) -> list[str]:
    """Buffers of the operators (RefConv's frozen basis, structured bases, DY-Conv's tau): identical on every rank
    by construction or by schedule, so DDP need not broadcast them every step."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, (ConvOp, StructuredLinear, SumPool)):
            names += [f"{prefix}.{n}" if prefix else n for n, _ in module.named_buffers(recurse=False)]
    return names
