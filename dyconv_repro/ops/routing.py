"""Block-shared routing: one routing computation per block, handed to every dynamic op inside it.

The papers route per block, not per layer: CondConv's TF reference computes one sigmoid router from
the MBConv block input and shares it across expand/depthwise/project; WeightNet computes one `x_gap`
per ShuffleNetV2 block; DyNet has one coefficient predictor per block. Here a `BlockRouter` child of
the block runs from a forward-pre-hook on the block: it pools the block input once, applies the
family's shared head (`DynamicConvOp.block_head`) and puts one tensor per op into a `RoutingSlot`;
a forward-hook clears the slots so no graph outlives the forward.

The slots are plain objects (not modules), shared by identity between the router and the ops:
no module appears twice in the tree, there is no reference cycle, `copy.deepcopy` keeps the sharing
(one memo) and the hooks are bound methods of the router, so they follow it into the copy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import DynamicConvOp, gap

CHANNEL_SLICES = ("all", "second_half")


class RoutingSlot:
    """Holds the routing input of one op for the duration of one block forward."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = None

    def __getstate__(self):  # never copy/pickle a transient tensor (it may carry an autograd graph)
        return None

    def __setstate__(self, state):
        self.value = None


class SharedHead(nn.Module):
    """pooled (B, C) -> body -> activation -> one tensor per op (the same tensor, or split columns)."""

    def __init__(self, body: nn.Module | None, out_dims: list[int], share: bool, activation: str | None = None):
        super().__init__()
        if activation not in (None, "sigmoid", "softmax"):
            raise ValueError(f"activation must be None, 'sigmoid' or 'softmax', got {activation!r}")
        self.body = body if body is not None else nn.Identity()
        self.out_dims = list(out_dims)
        self.share = share
        self.activation = activation

    def forward(self, pooled: Tensor) -> list[Tensor]:
        z = self.body(pooled)
        if self.activation == "sigmoid":
            z = torch.sigmoid(z)
        elif self.activation == "softmax":
            z = torch.softmax(z, dim=1)
        if self.share:
            return [z] * len(self.out_dims)
        return list(torch.split(z, self.out_dims, dim=1))


class BlockRouter(nn.Module):
    """Per-block routing: pools the block input once and fills every wired op's slot."""

    def __init__(self, in_channels: int, ops: list[DynamicConvOp], channel_slice: str = "all"):
        super().__init__()
        if channel_slice not in CHANNEL_SLICES:
            raise UserError(f"channel_slice {channel_slice!r} is not valid; choose one of {', '.join(CHANNEL_SLICES)}")
        self.in_channels = int(in_channels)
        self.channel_slice = channel_slice
        self.heads = nn.ModuleList()
        self._slots: list[list[RoutingSlot]] = []
        by_class: dict[type, list[DynamicConvOp]] = {}
        for op in ops:
            by_class.setdefault(type(op), []).append(op)
        for cls, group in by_class.items():
            head = cls.block_head(self.in_channels, group)
            slots = [RoutingSlot() for _ in group]
            for op, slot, dim in zip(group, slots, head.out_dims):
                op.attach_block_routing(slot, dim)
            self.heads.append(head)
            self._slots.append(slots)

    def forward(self, x: Tensor) -> None:
        pooled = gap(x)
        if self.channel_slice == "second_half":
            pooled = pooled[:, pooled.shape[1] - self.in_channels:]
        if pooled.shape[1] != self.in_channels:
            raise RuntimeError(f"block router expects {self.in_channels} input channels, got {pooled.shape[1]}")
        for head, slots in zip(self.heads, self._slots):
            for slot, value in zip(slots, head(pooled)):
                slot.value = value

    def clear(self) -> None:
        for slots in self._slots:
            for slot in slots:
                slot.value = None

    def pre_hook(self, block: nn.Module, args) -> None:
        self(args[0])

    def post_hook(self, block: nn.Module, args, output) -> None:
        self.clear()

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channel_slice={self.channel_slice!r}"


def wire_block(block: nn.Module, channel_slice: str = "all", in_channels: int | None = None) -> bool:
    """Give `block` a BlockRouter for the dynamic ops inside it; False if there are none (or already wired).

    `in_channels` defaults to the in_channels of the block's first conv-like module (forward order of
    the blocks we know); `channel_slice="second_half"` is ShuffleNetV2's stride-1 split.
    """
    if isinstance(getattr(block, "block_router", None), BlockRouter):
        return False
    ops = [m for m in block.modules() if isinstance(m, DynamicConvOp) and not m.block_routed]
    if not ops:
        return False
    if in_channels is None:
        in_channels = next(m.in_channels for m in block.modules() if hasattr(m, "in_channels"))
    router = BlockRouter(in_channels, ops, channel_slice)
    block.block_router = router
    block.register_forward_pre_hook(router.pre_hook)
    block.register_forward_hook(router.post_hook)
    return True
