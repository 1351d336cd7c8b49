"""Optimizer, parameter groups and LR schedule from a recipe (timm's factories do the work)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

from dyconv_repro.errors import UserError

_OPTIMIZERS = {"sgd": "sgd", "nesterov": "nesterov", "rmsproptf": "rmsproptf", "adamw": "adamw", "adam": "adam"}
_SCHEDULES = ("cosine", "step", "multistep", "linear", "none")


def effective_lr(recipe) -> float:
    """The linear scaling rule: lr x batch / lr_base_batch when lr_base_batch is set."""
    lr = float(recipe.lr)
    base = recipe.lr_base_batch
    return lr * float(recipe.batch_size) / float(base) if base else lr


def param_groups(model: nn.Module, weight_decay: float, skip_bn_bias: bool,
                 no_decay_params: Iterable[torch.Tensor] = ()) -> list[dict]:
    """Two groups: decayed weights, and (BN, biases, 1-d params, `no_decay_params`) without decay."""
    skip_ids = {id(p) for p in no_decay_params}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in skip_ids or (skip_bn_bias and p.ndim <= 1):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, recipe, no_decay_params: Iterable[torch.Tensor] = ()) -> torch.optim.Optimizer:
    name = str(recipe.optimizer).lower()
    if name not in _OPTIMIZERS:
        raise UserError(f"unknown recipe.optimizer {name!r}; valid: {', '.join(_OPTIMIZERS)}")
    if name == "sgd" and recipe.nesterov:
        name = "nesterov"
    groups = param_groups(model, float(recipe.weight_decay), bool(recipe.wd_skip_bn_bias),
                          no_decay_params)
    kwargs = {}
    if name in ("sgd", "nesterov", "rmsproptf"):
        kwargs["momentum"] = float(recipe.momentum)
    if name == "rmsproptf":
        kwargs.update(alpha=float(recipe.rmsprop_decay), eps=float(recipe.opt_eps))
    # weight decay is set per group above; timm must not regroup
    return create_optimizer_v2(groups, opt=_OPTIMIZERS[name], lr=effective_lr(recipe),
                               weight_decay=float(recipe.weight_decay), filter_bias_and_bn=False, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe, epochs: int, steps_per_epoch: int):
    """timm scheduler stepped per update (`step_update`), so the LR is a pure function of the step."""
    name = str(recipe.scheduler).lower()
    if name not in _SCHEDULES:
        raise UserError(f"unknown recipe.scheduler {name!r}; valid: {', '.join(_SCHEDULES)}")
    if name == "none":
        return None
    sched = {"linear": "poly"}.get(name, name)
    decay_rate = 1.0 if name == "linear" else float(recipe.decay_rate)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=float(recipe.decay_epochs),
        decay_milestones=list(recipe.decay_milestones),
        decay_rate=decay_rate, min_lr=float(recipe.min_lr),
        warmup_lr=float(recipe.warmup_lr), warmup_epochs=int(recipe.warmup_epochs),
        warmup_prefix=bool(recipe.warmup_prefix), cooldown_epochs=0,
        step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    return scheduler
