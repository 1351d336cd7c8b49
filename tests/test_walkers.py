"""Model walkers: duck-typed conversion, temperature, regularization and layer listing."""

from __future__ import annotations

import torch
from torch import nn

from dyconv_repro.ops import build_op
from dyconv_repro.ops.walkers import (
    decompose_model,
    refconv_layers,
    regularization_loss,
    reparameterize_model,
    set_temperature,
    structured_layers,
)


class _Tempered(nn.Module):
    """A stand-in for a dynamic op: a temperature buffer and a reparameterize() that returns a conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.register_buffer("tau", torch.tensor(30.0))

    def set_temperature(self, t):
        self.tau.fill_(t)

    def forward(self, x):
        return self.conv(x)

    def reparameterize(self):
        return self.conv


class _InPlace(nn.Module):
    """timm RepVGG-style: reparameterize() converts in place and returns None."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fused = False

    def forward(self, x):
        return self.conv(x)

    def reparameterize(self):
        self.fused = True


class _Wrapper(nn.Module):
    """A capable module whose children are capable too: the walker must not count them twice."""

    def __init__(self):
        super().__init__()
        self.inner = build_op("structured", 4, 4, 3)

    def forward(self, x):
        return self.inner(x)

    def regularization_loss(self):
        return 10 * self.inner.regularization_loss()


def _model():
    return nn.Sequential(
        build_op("structured", 4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(build_op("refconv", 4, 4, 3, groups=4, init="xavier"), _Tempered()),
        _InPlace(), build_op("structured", 4, 4, 1, mode="parameterize"), _Tempered(),
    )


def test_reparameterize_model_is_a_converted_eval_copy():
    torch.manual_seed(0)
    model = _model().train()
    dep = reparameterize_model(model)
    assert model.training and isinstance(model[0], nn.Module) and type(model[0]) is not nn.Conv2d
    assert not dep.training and all(not m.training for m in dep.modules())
    assert type(dep[0]) is nn.Conv2d and type(dep[3][0]) is nn.Conv2d and type(dep[3][1]) is nn.Conv2d
    assert type(dep[5]) is nn.Conv2d and type(dep[6]) is nn.Conv2d
    assert dep[4].fused and not model[4].fused  # in-place conversion kept, original untouched
    assert len(structured_layers(dep)) == 0 and len(refconv_layers(dep)) == 0
    single = reparameterize_model(build_op("refconv", 4, 4, 3))  # root itself convertible
    assert type(single) is nn.Conv2d


def test_decompose_model_and_layer_lists():
    model = _model()
    names = [n for n, _ in structured_layers(model)]
    assert names == ["0", "5"]
    assert [n for n, _ in refconv_layers(model)] == ["3.0"]
    dec = decompose_model(model)
    assert isinstance(dec[0], nn.Sequential) and isinstance(dec[5], nn.Sequential)
    assert structured_layers(dec) == []


def test_set_temperature_counts_and_sets():
    model = _model()
    assert set_temperature(model, 5.0) == 2
    assert model[3][1].tau.item() == 5.0 and model[6].tau.item() == 5.0
    assert set_temperature(nn.Conv2d(1, 1, 1), 1.0) == 0


def test_regularization_loss_sum_and_zero():
    torch.manual_seed(0)
    model = _model()
    total = regularization_loss(model)
    assert total.dim() == 0 and total.item() > 0
    torch.testing.assert_close(total, model[0].regularization_loss() + model[5].regularization_loss())
    total.backward()
    assert model[0].weight.grad is not None
    zero = regularization_loss(nn.Sequential(nn.Conv2d(2, 2, 1)))
    assert zero.dim() == 0 and zero.item() == 0.0
    assert regularization_loss(nn.ReLU()).item() == 0.0
    w = _Wrapper()  # outermost capable module only
    torch.testing.assert_close(regularization_loss(nn.Sequential(w)), 10 * w.inner.regularization_loss())
