"""Parameters and multiply-adds at batch 1, counted by torch.utils.flop_counter.FlopCounterMode.

Convention (state it next to every table): MAdds = FLOPs / 2 of the aten ops FlopCounterMode
knows: convolutions, mm / addmm / bmm / baddbmm, plus mv / addmv (added here: the batch-1 routing and
kernel mix run as matrix-vector products), so nn.Linear, routing FCs and kernel aggregation written as
matmul / einsum count, K MAdds per kernel weight per sample, and attention.
Free: elementwise ops (activations, BN in eval, residual adds, SE/attention scaling,
mul+sum aggregation written without a matmul), pooling and global averaging, conv bias adds.
The model runs in eval mode at batch 1, so an operator's inference path is what is counted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _mv_flop(mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    """(M, N) @ (N,): 2*M*N FLOPs, the mm convention with one column."""
    m, n = mat_shape
    return 2 * m * n


def _addmv_flop(self_shape, mat_shape, vec_shape, *args, out_shape=None, **kwargs) -> int:
    return _mv_flop(mat_shape, vec_shape)


MATRIX_VECTOR_FLOPS = {aten.mv: _mv_flop, aten.addmv: _addmv_flop}


def count_params(model: nn.Module) -> int:
    """All parameters, trainable or frozen (buffers such as RefConv's frozen basis excluded)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_madds(model: nn.Module, image_size: int, in_chans: int = 3) -> int:
    """Multiply-adds of one forward pass on a 1 x in_chans x image_size x image_size input (eval mode)."""
    was_training = model.training
    p = next(model.parameters(), None)
    x = torch.zeros(1, in_chans, int(image_size), int(image_size),
                    device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else None)
    # FlopCounterMode's module tracker hooks every tensor that requires grad; under no_grad a view of a
    # trainable parameter (RefConv's jointly trained basis, reshaped) requires grad with no grad_fn, which
    # the tracker rejects. Counting needs no gradients: switch them off for the pass and restore them.
    grads = [(q, q.requires_grad) for q in model.parameters()]
    try:
        model.eval()
        for q, _ in grads:
            q.requires_grad_(False)
        with FlopCounterMode(display=False, custom_mapping=MATRIX_VECTOR_FLOPS) as counter:
            model(x)
    finally:
        model.train(was_training)
        for q, flag in grads:
            q.requires_grad_(flag)
    return int(counter.get_total_flops()) // 2


def deploy_form(model: nn.Module) -> nn.Module:
    """The re-parameterized model (ops.walkers.reparameterize_model) when that walker exists, else the model."""
    try:
        from dyconv_repro.ops.walkers import reparameterize_model
    except ModuleNotFoundError as e:  # pragma: no cover - only while the library is being written
        if e.name != "dyconv_repro.ops.walkers":
            raise
        return model
    return reparameterize_model(model)


def complexity_report(model: nn.Module, image_size: int, in_chans: int = 3) -> dict[str, int]:
    """params / madds of the training form and deploy_params / deploy_madds of the deployed form."""
    params, madds = count_params(model), count_madds(model, image_size, in_chans)
    if not any(callable(getattr(m, "reparameterize", None)) for m in model.modules()):
        return {"params": params, "madds": madds, "deploy_params": params, "deploy_madds": madds}
    deployed = deploy_form(model)
    return {"params": params, "madds": madds,
            "deploy_params": count_params(deployed), "deploy_madds": count_madds(deployed, image_size, in_chans)}
