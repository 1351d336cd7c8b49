"""`apply_block_routing(model)`: switch a swapped model from per-layer to per-block routing.

Called by `build_model` after surgery when `policy.block_routing: true`. Recognizes the blocks of the
backbones we build (torchvision MobileNetV2/V3, ShuffleNetV2, ResNet; timm EfficientNet/MixNet/
MnasNet blocks) plus any class added with `register_block`, and wires each block that contains
dynamic ops with a `BlockRouter` (see dyconv_repro/ops/routing.py for the mechanism).
"""

from __future__ import annotations

from torch import nn

from dyconv_repro.ops.routing import CHANNEL_SLICES, wire_block

# block class -> callable(block) -> channel_slice ("all" | "second_half")
_BLOCK_TYPES: dict[type, object] = {}


def register_block(cls: type, channel_slice="all") -> None:
    """Make `apply_block_routing` recognize `cls`; `channel_slice` is a name or a callable(block) -> name."""
    if not callable(channel_slice) and channel_slice not in CHANNEL_SLICES:
        raise ValueError(f"channel_slice must be one of {CHANNEL_SLICES} or a callable")
    _BLOCK_TYPES[cls] = channel_slice


def _shufflenet_slice(block: nn.Module) -> str:
    # stride 1: the branch sees the second half of the channels; stride 2: the whole input
    return "second_half" if getattr(block, "stride", 1) == 1 else "all"


def _register_library_blocks() -> None:
    from torchvision.models import mobilenetv2, mobilenetv3, resnet, shufflenetv2

    for cls in (mobilenetv2.InvertedResidual, mobilenetv3.InvertedResidual, resnet.BasicBlock, resnet.Bottleneck):
        register_block(cls)
    register_block(shufflenetv2.InvertedResidual, _shufflenet_slice)
    try:
        from timm.models import _efficientnet_blocks as eb
    except ImportError:  # pragma: no cover - timm is a dependency, but keep torchvision-only use working
        return
    # timm's CondConvResidual routes its own timm CondConv2d convs (two-argument forward) and is left alone.
    for name in ("InvertedResidual", "DepthwiseSeparableConv", "EdgeResidual", "UniversalInvertedResidual"):
        if hasattr(eb, name):
            register_block(getattr(eb, name))


_register_library_blocks()


def apply_block_routing(model: nn.Module) -> int:
    """Wire every recognized block holding dynamic ops with block-shared routing; returns the count."""
    n = 0
    for module in list(model.modules()):
        rule = next((r for cls, r in _BLOCK_TYPES.items() if isinstance(module, cls)), None)
        if rule is None:
            continue
        channel_slice = rule(module) if callable(rule) else rule
        n += int(wire_block(module, channel_slice=channel_slice))
    return n
