"""The one dispatch point: its choices by device type on real layer shapes, and what it never does on GPUs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision
from torch import nn

from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.engine import ConvCall, DynamicConvOp, paths, select_path

BATCHES = (1, 64, 256)


def conv_calls(model: nn.Module, device_type: str, batch: int, size: int = 224, channels_last: bool = False,
               dtype=torch.float32) -> list[tuple[str, ConvCall]]:
    """Every conv of `model` as the ConvCall a dynamic op in its place would make (shapes from a meta pass)."""
    model = model.to("meta").eval()
    seen = []

    def record(name):
        def hook(module, args):
            x = args[0]
            seen.append((name, ConvCall(device_type, batch, x.shape[1], tuple(x.shape[-2:]),
                                        (module.out_channels, module.in_channels // module.groups, *module.kernel_size),
                                        module.stride, module.padding, module.dilation, module.groups, channels_last,
                                        dtype)))
        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.empty(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return seen


def _models():
    return {"resnet18": torchvision.models.resnet18(), "mobilenet_v2": torchvision.models.mobilenet_v2()}


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_cuda_never_gets_the_per_sample_loop(name):
    """On a CUDA device type every real layer of ResNet-18 and MobileNetV2, at batch 1, 64 and 256, in both
    layouts and dtypes, runs as the fold or the batched matmul (1x1) -- never one conv per sample."""
    model = _models()[name]
    for batch in BATCHES:
        for channels_last, dtype in ((False, torch.float32), (True, torch.bfloat16)):
            calls = conv_calls(model, "cuda", batch, channels_last=channels_last, dtype=dtype)
            assert len(calls) > 15
            for layer, call in calls:
                choice = select_path(call)
                assert choice in ("fold", "matmul"), (name, layer, batch, choice)
                assert (choice == "matmul") == call.pointwise, (name, layer, batch)


def test_cpu_rules_stay_as_measured():
    """The same shapes on CPU keep the measured CPU rules (big per-sample convs loop): the rules are keyed by
    device type, and this test would fail if CPU and CUDA shared them."""
    calls = conv_calls(_models()["resnet18"], "cpu", 256)
    choices = {layer: select_path(call) for layer, call in calls}
    assert choices["layer1.0.conv1"] == "loop" and choices["layer4.1.conv2"] == "loop"
    assert all(select_path(call) == "fold" for _, call in conv_calls(_models()["resnet18"], "cpu", 1)
               if not call.pointwise)  # batch 1: the plain conv with the aggregated kernel
    assert select_path(dataclasses.replace(dict(calls)["layer1.0.conv1"], device_type="cuda")) == "fold"
    dw = dict(conv_calls(_models()["mobilenet_v2"], "cpu", 64))["features.2.conv.1.0"]  # 96-ch dw @ 112^2
    assert select_path(dw) == "loop"


@pytest.mark.parametrize("name", [n for n in OPS.names() if issubclass(OPS.get(n), DynamicConvOp)])
def test_dynamic_ops_run_on_a_device_without_backend(name, monkeypatch):
    """Built on the meta device (device=..., like timm layers) and fed a batch-256 meta input, every dynamic op
    goes through the device-agnostic engine: fold / matmul chosen, the loop never called."""
    monkeypatch.setitem(paths.PATHS, "loop", lambda *a: pytest.fail("the per-sample loop ran on a non-CPU device"))
    for k, groups in ((3, 1), (1, 1), (3, 32)):
        op = build_op(name, 32, 32, k, groups=groups, device="meta").train()
        assert all(p.device.type == "meta" for p in op.parameters())
        x = torch.empty(256, 32, 56, 56, device="meta", requires_grad=True)
        y = op(x)
        assert y.shape == (256, 32, 56, 56) and y.device.type == "meta"
        y.sum().backward()
