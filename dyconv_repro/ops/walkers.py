"""Model-level walkers over the operators' duck-typed capabilities.

They look only at method names (`reparameterize`, `decompose`, `set_temperature`,
`regularization_loss`), so they work for every operator, including ones written later. A module that
has the capability is handled as a whole: its children are not visited again (no double counting).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn


def _capable(module: nn.Module, attr: str) -> bool:
    return callable(getattr(module, attr, None))


def iter_capable(model: nn.Module, attr: str, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Outermost modules (root included) that have a callable `attr`, as (qualified name, module)."""
    if _capable(model, attr):
        yield prefix, model
        return
    for name, child in model.named_children():
        yield from iter_capable(child, attr, f"{prefix}.{name}" if prefix else name)


def _convert(model: nn.Module, attr: str, select=None) -> nn.Module:
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        if _capable(model, attr):
            if select is not None and not select(model):
                return model
            new = getattr(model, attr)()
            return (model if new is None else new).eval()
        _convert_children(model, attr, select)
    return model.eval()


def _convert_children(module: nn.Module, attr: str, select=None) -> None:
    for name, child in list(module.named_children()):
        if _capable(child, attr):
            if select is not None and not select(child):
                continue
            new = getattr(child, attr)()
            if new is not None:  # None: the module converted itself in place (timm's RepVGG-style blocks)
                setattr(module, name, new)
        else:
            _convert_children(child, attr, select)


def reparameterize_model(model: nn.Module) -> nn.Module:
    """Deep copy in eval mode with every op that can replaced by its plain equivalent (`reparameterize()`)."""
    return _convert(model, "reparameterize")


def decompose_model(model: nn.Module, select=None) -> nn.Module:
    """Deep copy in eval mode with every structured op -- or those for which `select(layer)` is true -- replaced
    by its `decompose()` (SumPool + small conv); the others are left as they are."""
    return _convert(model, "decompose", select)


def set_temperature(model: nn.Module, t: float) -> int:
    """Set the softmax temperature of every op that has one; returns how many were set."""
    mods = list(iter_capable(model, "set_temperature"))
    for _, m in mods:
        m.set_temperature(t)
    return len(mods)


def regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the ops' `regularization_loss()` (0-dim tensor; 0.0 on the model's device if none)."""
    losses = [m.regularization_loss() for _, m in iter_capable(model, "regularization_loss")]
    if losses:
        return torch.stack([loss.reshape(()) for loss in losses]).sum()
    p = next(model.parameters(), None)
    return torch.zeros((), device=p.device if p is not None else None)


def structured_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer that can be decomposed into the structured form."""
    return list(iter_capable(model, "decompose"))


def refconv_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every RefConv-style layer (a `refocused_weight()` over a basis)."""
    return list(iter_capable(model, "refocused_weight"))
