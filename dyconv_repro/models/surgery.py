"""Conv surgery: replace the convs (and, where a paper does, the classifier) that a policy selects.

One pass: infer roles (roles.py), build the operator with the conv's exact geometry, draw its kernels at
the replaced layer's init scale (`init_like`), copy the original kernel into it where that is meaningful
(`load_static_weight`; RefConv always, others when `policy.copy_weights` or the op's `init_from_static`),
and swap it in. The returned LayerReport list is what `dyconv-complexity
--layers` prints.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import torch
from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.models.policy import Policy, load_policy
from dyconv_repro.models.roles import LayerReport, infer_layers
from dyconv_repro.ops import OPS, build_op


def _linear_class(op_name: str) -> type:
    """The operator's fully connected form (`linear_form` on its class), for policies that replace the classifier."""
    cls = OPS.get(op_name).linear_form
    if cls is None:
        with_form = [n for n in OPS.names() if getattr(OPS.get(n), "linear_form", None) is not None]
        raise UserError(f"operator {op_name!r} has no fully connected form, so the policy cannot replace the "
                        f"classifier; remove 'classifier' from policy.roles (ops with one: {', '.join(with_form)})")
    return cls


def _accepted(cls: type, kwargs: Mapping) -> dict:
    """Keep only the kwargs `cls` takes (a linear form may not take the conv-only options)."""
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(kwargs)
    return {k: v for k, v in kwargs.items() if k in params}


def _padding(conv: nn.Module):
    pad = getattr(conv, "padding", None)
    if isinstance(pad, str):
        return None if pad == "same" else 0
    if type(conv).__name__ == "Conv2dSame":  # timm TF-'same' padding: symmetric same is the closest
        return None
    return pad


def _build_replacement(report: LayerReport, op_name: str, kwargs: dict) -> nn.Module:
    """The operator for `report`'s layer, built on the layer's device and dtype."""
    old = report.module
    dd = dict(device=old.weight.device, dtype=old.weight.dtype)
    if report.role == "classifier":
        cls = _linear_class(op_name)
        return cls(old.in_features, old.out_features, bias=old.bias is not None, **_accepted(cls, kwargs), **dd)
    return build_op(op_name, old.in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=_padding(old), dilation=old.dilation, groups=old.groups, bias=old.bias is not None,
                    **kwargs, **dd)


def _should_copy(op_cls: type, policy: Policy, new: nn.Module) -> bool:
    wanted = policy.copy_weights or op_cls.copies_static_weight or bool(getattr(new, "init_from_static", False))
    return callable(getattr(new, "load_static_weight", None)) and wanted


def _init_like_replaced(new: nn.Module, old: nn.Module) -> None:
    """Draw the operator's kernels at the replaced layer's scale (`init_like`), not PyTorch's default init:
    the backbone's initializer of that layer is what the paper's code gives each expert/kernel."""
    init_like = getattr(new, "init_like", None)
    if callable(init_like):
        with torch.no_grad():
            init_like(old.weight.detach(), None if old.bias is None else old.bias.detach())


def _is_depthwise(conv: nn.Module) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def swap_convs(model: nn.Module, op_name: str, policy=None, op_kwargs: Mapping | None = None,
               image_size: int | None = None) -> list[LayerReport]:
    """Replace the layers `policy` selects by operator `op_name` in place; returns one report per layer.

    `policy` is a Policy, a policy name ("auto" = the op's paper policy) or a config mapping.
    `image_size` only sets the resolution of the tracing pass that assigns stages (default 64).
    """
    op_cls = OPS.get(op_name)  # unknown operator -> UserError listing the valid ones
    policy = load_policy(policy, op_name)
    if op_kwargs is not None and not isinstance(op_kwargs, dict):  # DictConfig -> plain (lists, not ListConfig)
        from omegaconf import DictConfig, OmegaConf

        op_kwargs = OmegaConf.to_container(op_kwargs, resolve=True) if isinstance(op_kwargs, DictConfig) else dict(op_kwargs)
    reports = infer_layers(model, image_size)
    if getattr(op_cls, "baseline", False):  # the static baseline: the model's own convs stay
        return reports
    named = dict(model.named_modules())
    for r in reports:
        if not policy.selects(r):
            continue
        old = r.module
        if not isinstance(old, nn.Conv2d | nn.Linear):
            r.note = f"kept: {type(old).__name__} is not a plain conv"
            continue
        if isinstance(old, nn.Conv2d) and old.padding_mode != "zeros":
            r.note = f"kept: padding_mode={old.padding_mode}"
            continue
        if op_cls.depthwise_only and r.role != "classifier" and not _is_depthwise(old):
            r.note = f"kept: {op_name} replaces depthwise convs only"
            continue
        kwargs = policy.kwargs_for(r.role, op_kwargs or {})
        try:
            new = _build_replacement(r, op_name, kwargs)
        except UserError:
            raise
        except (TypeError, ValueError) as e:
            raise UserError(f"cannot build {op_name} for layer {r.name} ({r.role}, shape {r.shape}): {e}") from None
        new = new.to(device=old.weight.device, dtype=old.weight.dtype).train(old.training)  # buffers made on CPU
        _init_like_replaced(new, old)
        if _should_copy(op_cls, policy, new):
            with torch.no_grad():
                new.load_static_weight(old.weight.detach(), None if old.bias is None else old.bias.detach())
        parent_name, _, child = r.name.rpartition(".")
        setattr(named[parent_name] if parent_name else model, child, new)
        r.replaced, r.op, r.module = True, op_name, new
    share = getattr(op_cls, "share_across_layers", None)
    if callable(share):  # parameters shared across layers (KernelWarehouse): one model-level object, made here
        share(model, reports)
    return reports


def replaced_layers(reports: list[LayerReport]) -> dict:
    """What a run records about its surgery: every replaced layer (name, role, op, shape, stride, groups) and a
    digest of that list, so two runs (or a run and `dyconv-complexity --layers`) can be compared at a glance."""
    import hashlib
    import json

    layers = [{"name": r.name, "role": r.role, "op": r.op, "shape": list(r.shape), "stride": list(r.stride),
               "groups": r.groups} for r in reports if r.replaced]
    digest = hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]
    return {"replaced_layers": layers, "replaced_layers_digest": digest}


def layer_table(reports: list[LayerReport], show_internal: bool = False) -> str:
    """The per-layer surgery table as text."""
    rows = [r for r in reports if show_internal or r.role not in ("internal", "se", "linear", "unused")]
    head = f"{'layer':<40} {'role':<10} {'stage':>5} {'in->out':>11} {'k':>5} {'s':>3} {'g':>5}  {'op':<12} replaced"
    lines = [head, "-" * len(head)]
    for r in rows:
        io = f"{r.in_channels}->{r.out_channels}"
        k = "x".join(map(str, r.kernel)) if r.kernel else "-"
        s = str(r.stride[0]) if r.stride else "-"
        stage = "-" if r.stage is None else str(r.stage)
        note = f"  ({r.note})" if r.note else ""
        lines.append(f"{r.name:<40} {r.role:<10} {stage:>5} {io:>11} {k:>5} {s:>3} {r.groups:>5}  {r.op:<12} "
                     f"{'yes' if r.replaced else 'no'}{note}")
    n_conv = sum(r.role not in ("classifier", "linear", "internal", "se", "unused") for r in reports)
    n_rep = sum(r.replaced for r in reports)
    lines.append(f"replaced {n_rep} of {n_conv} convs + classifier" if any(
        r.replaced and r.role == "classifier" for r in reports) else f"replaced {n_rep} of {n_conv} convs")
    lines.append(f"replaced-layers digest {replaced_layers(reports)['replaced_layers_digest']} "
                 "(summary.json of a run with this config records the same)")
    return "\n".join(lines)


def print_layer_table(reports: list[LayerReport], show_internal: bool = False) -> None:
    """Print `layer_table(reports)`."""
    print(layer_table(reports, show_internal))
