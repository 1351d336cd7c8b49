"""`build_model(cfg)`: backbone -> weights -> operator surgery -> block routing -> op checkpoint.

The order matters: pretrained / plain `init_from` weights go into the *plain* backbone so that the
surgery can copy them into the operators (RefConv's basis, CondConv/DY-Conv experts with
copy_weights); an `init_from` checkpoint of an already swapped model is loaded at the end.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from dyconv_repro.errors import UserError
from dyconv_repro.models.policy import load_policy
from dyconv_repro.models.pretrained import check_state_dict, load_checked, load_pretrained, read_checkpoint
from dyconv_repro.models.registry import BACKBONES
from dyconv_repro.models.roles import LayerReport
from dyconv_repro.models.surgery import swap_convs
from dyconv_repro.models.timm_models import build_timm
from dyconv_repro.models.torchvision_models import build_torchvision
from dyconv_repro.ops import OPS

SOURCES = ("dyconv", "torchvision", "timm")


def _plain(node) -> dict:
    """A resolved plain dict from a DictConfig / mapping / None."""
    if node is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(node)


def build_backbone(model_cfg: Mapping, num_classes: int, image_size: int) -> nn.Module:
    """The plain backbone of `model_cfg` (source dyconv = our BACKBONES, or any torchvision/timm name)."""
    model_cfg = _plain(model_cfg)
    source = str(model_cfg.get("source") or "dyconv")
    name = model_cfg.get("name")
    if not name:
        raise UserError(f"model.name is empty; choose one of: {', '.join(BACKBONES.names())}")
    if source == "torchvision":
        return build_torchvision(model_cfg, num_classes, image_size)
    if source == "timm":
        return build_timm(model_cfg, num_classes, image_size)
    if source != "dyconv":
        raise UserError(f"unknown model.source {source!r}; valid: {', '.join(SOURCES)}")
    return BACKBONES.get(str(name))(model_cfg, num_classes, image_size)


def build_model_with_report(cfg, verbose: bool = True) -> tuple[nn.Module, list[LayerReport]]:
    """`build_model` plus the per-layer surgery report."""
    model_cfg = _plain(cfg.get("model"))
    data = _plain(cfg.get("data"))
    num_classes = int(model_cfg.get("num_classes") or data.get("num_classes") or 1000)
    image_size = int(data.get("image_size") or 224)
    model = build_backbone(model_cfg, num_classes, image_size)

    load_pretrained(model, model_cfg.get("pretrained"), verbose=verbose)
    late_sd, init_path = None, model_cfg.get("init_from")
    if init_path:
        sd = read_checkpoint(init_path)
        if check_state_dict(model, sd, str(init_path)).ok:  # a checkpoint of the plain backbone
            load_checked(model, sd, str(init_path), verbose=verbose)
        else:  # must be a checkpoint of the swapped model
            late_sd = sd

    op = _plain(cfg.get("op")) or {"name": "conv"}
    op_name = str(op.get("name") or "conv")
    OPS.get(op_name)  # an unknown operator -> UserError listing the valid ones
    policy = load_policy(cfg.get("policy"), op_name)
    reports = swap_convs(model, op_name, policy, op.get("kwargs") or {}, image_size=image_size)
    if op_name != "conv" and not any(r.replaced for r in reports) and not policy.allow_empty:
        n_conv = sum(r.role in ("stem", "depthwise", "pointwise", "dense", "head") for r in reports)
        raise UserError(f"op={op_name} with policy {policy.name} replaces none of the {n_conv} convs of "
                        f"model {model_cfg.get('name')} (its roles: {', '.join(policy.roles) or 'none'}), so the "
                        "run would train the static baseline; choose other roles (e.g. policy.roles=[dense]) or "
                        "set policy.allow_empty=true to accept it")
    if verbose and op_name != "conv":
        n_conv = sum(r.role in ("stem", "depthwise", "pointwise", "dense", "head") for r in reports)
        n_cls = sum(r.replaced and r.role == "classifier" for r in reports)
        print(f"[surgery] op={op_name} policy={policy.name}: replaced {sum(r.replaced for r in reports) - n_cls} "
              f"of {n_conv} convs" + (" + the classifier" if n_cls else ""), flush=True)

    if policy.block_routing and op_name != "conv":
        try:
            from dyconv_repro.models.block_routing import apply_block_routing, register_block
        except ModuleNotFoundError as e:
            if e.name != "dyconv_repro.models.block_routing":
                raise
            raise UserError("policy.block_routing=true needs dyconv_repro/models/block_routing.py, which this "
                            "checkout lacks; set policy.block_routing=false") from None
        from dyconv_repro.models.cifar_resnet import BasicBlock

        register_block(BasicBlock)  # our CIFAR ResNet block (library blocks are registered there)
        n = apply_block_routing(model)
        if verbose:
            print(f"[surgery] block-shared routing wired in {n} blocks", flush=True)

    if late_sd is not None:
        load_checked(model, late_sd, str(init_path), verbose=verbose,
                     hint=f"It fits neither the plain {model_cfg.get('name')} nor it with op={op_name} "
                          f"policy={policy.name}; build the model it was saved from.")
    return model, reports


def build_model(cfg) -> nn.Module:
    """Build the whole model from a composed config (cfg.model, cfg.op, cfg.policy, cfg.data)."""
    return build_model_with_report(cfg)[0]
