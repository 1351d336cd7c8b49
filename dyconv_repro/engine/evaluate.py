"""Top-1/top-5 evaluation, reduced across ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dyconv_repro.engine.distributed import DistInfo, reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, info: DistInfo | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False, max_steps: int | None = None,
             progress=None) -> dict:
    """Returns {'top1', 'top5', 'loss', 'n'} over the whole (possibly sharded) loader."""
    info = info or DistInfo()
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss_sum, n
    for i, (images, targets) in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(targets[:, None])
        totals[0] += hit[:, :1].sum()
        totals[1] += hit.any(dim=1).sum()
        totals[2] += F.cross_entropy(logits, targets, reduction="sum")
        totals[3] += targets.numel()
        if progress is not None:
            progress.update(1)
    totals = reduce_sum(totals, info)
    n = max(totals[3].item(), 1.0)
    return {"top1": 100.0 * totals[0].item() / n, "top5": 100.0 * totals[1].item() / n,
            "loss": totals[2].item() / n, "n": int(totals[3].item())}
