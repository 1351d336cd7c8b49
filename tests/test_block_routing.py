"""Block-shared routing: wiring, equality with a hand computation, deepcopy and state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual
from torch import nn
from torchvision.models import mobilenet_v2, resnet
from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleBlock

from dyconv_repro.models.block_routing import apply_block_routing
from dyconv_repro.ops import build_op
from dyconv_repro.ops.engine import DynamicConvOp, aggregate
from dyconv_repro.ops.routing import BlockRouter


def swap(model: nn.Module, name: str, **kwargs) -> nn.Module:
    """Minimal stand-in for surgery: every nn.Conv2d -> op `name` with the same geometry."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, child_name, build_op(
                    name, child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups, child.bias is not None, **kwargs))
    return model


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_wires_library_blocks_and_per_layer_stays_default():
    mb = swap(mobilenet_v2(width_mult=0.25, num_classes=10), "condconv", num_experts=2)
    n_blocks = sum(isinstance(m, type(mb.features[1])) for m in mb.modules())
    assert not any(isinstance(m, BlockRouter) for m in mb.modules())  # default: per-layer routing
    assert apply_block_routing(mb) == n_blocks == 17
    assert apply_block_routing(mb) == 0  # idempotent
    # stem and head convs are outside blocks: still per-layer
    assert not mb.features[0][0].block_routed and not mb.features[18][0].block_routed
    assert all(m.block_routed for blk in mb.features[1:18] for m in blk.modules() if isinstance(m, DynamicConvOp))
    mb.eval()
    assert mb(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    blocks = [DepthwiseSeparableConv(8, 8), InvertedResidual(8, 16, exp_ratio=2.0, stride=2),
              resnet.BasicBlock(8, 8), ShuffleBlock(8, 8, 1), ShuffleBlock(8, 8, 2)]
    for blk in blocks:
        swap(blk, "dynamicconv", num_kernels=2)
        assert apply_block_routing(blk) == 1, type(blk)
        blk.eval()
        assert blk(torch.randn(2, 8, 8, 8)).shape[0] == 2
    plain = resnet.BasicBlock(8, 8)
    assert apply_block_routing(plain) == 0  # no dynamic ops, nothing to wire


def test_condconv_block_router_matches_manual_computation():
    blk = swap(resnet.BasicBlock(6, 6), "condconv", num_experts=3)
    assert apply_block_routing(blk) == 1
    _randomize_bn(blk)
    blk.eval()
    x = torch.randn(3, 6, 7, 7)
    head = blk.block_router.heads[0].body
    r = torch.sigmoid(head(x.mean((2, 3))))  # one router from the block input, shared by conv1 and conv2
    out = []
    for i in range(3):
        w1, w2 = aggregate(r[i:i + 1], blk.conv1.weight)[0], aggregate(r[i:i + 1], blk.conv2.weight)[0]
        h = F.relu(blk.bn1(F.conv2d(x[i:i + 1], w1, padding=1)))
        h = blk.bn2(F.conv2d(h, w2, padding=1))
        out.append(F.relu(h + x[i:i + 1]))
    torch.testing.assert_close(blk(x), torch.cat(out), atol=1e-5, rtol=1e-4)
    assert blk.conv1.router is None and blk.conv2.router is None
    assert all(s.value is None for slots in blk.block_router._slots for s in slots)  # no graph kept alive
    with pytest.raises(RuntimeError, match="block"):
        blk.conv1(x)


def test_weightnet_shufflenet_uses_branch_input_and_one_x_gap():
    blk = swap(ShuffleBlock(8, 8, 1), "weightnet")
    assert apply_block_routing(blk) == 1
    _randomize_bn(blk)
    blk.eval()
    x = torch.randn(2, 8, 6, 6)
    x2 = x[:, 4:]  # stride-1 ShuffleNetV2: the branch sees the second half
    x_gap = blk.block_router.heads[0].body(x2.mean((2, 3)))
    assert x_gap.shape == (2, 16)
    h = x2
    for layer in blk.branch2:
        if isinstance(layer, DynamicConvOp):
            a = torch.sigmoid(layer.fc1(x_gap))
            w = (a.reshape(2, *layer.fc2.shape[:1], -1) * layer.fc2.squeeze(-1)).reshape(
                2, layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
            h = torch.cat([F.conv2d(h[i:i + 1], w[i], None, layer.stride, layer.padding, 1, layer.groups)
                           for i in range(2)])
            assert layer.reduce is None
        else:
            h = layer(h)
    out = torch.cat([x[:, :4], h], 1).reshape(2, 2, 4, 6, 6).transpose(1, 2).reshape(2, 8, 6, 6)
    torch.testing.assert_close(blk(x), out, atol=1e-5, rtol=1e-4)


def test_dynet_block_predictor_splits_coefficients():
    blk = swap(InvertedResidual(8, 8, exp_ratio=2.0), "dynet", num_bases=3)
    assert apply_block_routing(blk) == 1
    blk.eval()
    ops = [m for m in blk.modules() if isinstance(m, DynamicConvOp)]
    head = blk.block_router.heads[0]
    assert head.out_dims == [op.out_channels * 3 for op in ops]
    x = torch.randn(2, 8, 5, 5)
    eta = torch.sigmoid(head.body(x.mean((2, 3))))
    seen = []
    hooks = [op.register_forward_hook(lambda m, a, o: seen.append(m.coefficients(a[0]))) for op in ops]
    blk(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(torch.cat([s.reshape(2, -1) for s in seen], 1), eta)


def test_block_routing_survives_deepcopy_state_dict_and_pickle():
    def build():
        torch.manual_seed(1)
        m = swap(nn.Sequential(resnet.BasicBlock(6, 6), resnet.BasicBlock(6, 6)), "dynamicconv", num_kernels=2)
        apply_block_routing(m)
        return m.eval()

    model = build()
    x = torch.randn(2, 6, 5, 5)
    y = model(x)
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin(x), y)
    # the copy routes through its own router: its slots are the ones its ops hold, not the original's
    for blk, blk_t in zip(model, twin):
        assert blk_t.conv1._slot is blk_t.block_router._slots[0][0]
        assert blk_t.conv1._slot is not blk.conv1._slot
    with torch.no_grad():
        twin[0].conv1.attention[0].weight.add_(1.0)
    assert not torch.allclose(twin(x), y)
    torch.testing.assert_close(model(x), y)  # the original is untouched
    fresh = build()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(0.5)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), y)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), y)


@pytest.mark.parametrize("name, kwargs", [("condconv", {"num_experts": 3}), ("dynamicconv", {"num_kernels": 3}),
                                          ("weightnet", {"M": 1, "G": 1})])
def test_block_routed_sample_alone_equals_in_batch(name, kwargs, batch_one_impl):
    """Block-routed ops at batch 1 (eval, no grad) take the flat batch-1 path with the block's routing
    input; each sample alone == the same sample in a batch (the batched path)."""
    mb = swap(mobilenet_v2(width_mult=0.25, num_classes=10), name, **kwargs)
    assert apply_block_routing(mb) == 17
    _randomize_bn(mb)
    mb.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        batch = mb(x)
        alone = torch.cat([mb(x[i:i + 1]) for i in range(3)])
    op = mb.features[2].conv[1][0]
    assert op.block_routed
    torch.testing.assert_close(alone, batch, rtol=1e-4, atol=1e-5)
