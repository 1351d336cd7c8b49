"""Recompute BatchNorm running statistics before an evaluation ("precise BN", as pycls and fvcore do it).

Why: BN's running statistics are an exponential average over the last ~1/momentum training steps. When the
pre-BN scale still drifts that fast, eval-mode statistics lag the weights being evaluated. At ImageNet scale
(thousands of steps per epoch) the lag is negligible; at smoke scale (the digits demo: 11 steps per epoch) it
is not. Measured: ODConv ResNet-20 on digits, tau 30 fixed, 5 epochs: train-mode top-1 89 %, eval-mode 20.6 %,
the same weights with recomputed statistics 91.4 % (backbone BN running_var 1.2x to 10x the actual variance).

Off by default (`trainer.bn_recalibrate: 0`); no paper's recipe uses it. The averaging is
`torch.optim.swa_utils.update_bn`. The training RNG streams are left untouched, so a run with it resumes as
reproducibly as one without.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.optim.swa_utils import update_bn


def recalibrate_bn(model: nn.Module, loader, device: torch.device, num_batches: int,
                   generator: torch.Generator | None = None, amp_dtype: torch.dtype | None = None,
                   channels_last: bool = False) -> int:
    """Set every BatchNorm's running mean/var to the plain average over the first `num_batches` batches of
    `loader` (images only; no mixup), with the current weights. Returns the number of batches used (0 when
    `num_batches` is 0 or the model has no BatchNorm: update_bn then draws nothing).

    `generator` (the loader's sampler generator) and the global RNGs are restored afterwards, so the next
    training epoch sees the same order and augmentations it would have seen without this call."""
    if num_batches <= 0:
        return 0
    saved = generator.get_state() if generator is not None else None
    devices = [device.index or 0] if device.type == "cuda" else []
    used = 0

    def images():
        nonlocal used
        for batch, _ in itertools.islice(loader, num_batches):
            batch = batch.to(device, non_blocking=True)
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            used += 1
            yield batch

    with torch.random.fork_rng(devices=devices), \
            torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        update_bn(images(), model)
    if saved is not None:
        generator.set_state(saved)
    return used


__all__ = ["recalibrate_bn"]
