"""Rows train the paper's recipe or say where they depart: composed recipe values, their sources, and the
model settings the TF EfficientNet-CondConv code trains with."""

from __future__ import annotations

import torch

from dyconv_repro.config import compose
from dyconv_repro.models.build import build_model
from dyconv_repro.results.recipes import render_page, value_sources


def test_condconv_effnet_row_uses_the_tf_lr_scaling_drop_path_and_bn_settings():
    cfg = compose(["experiment=condconv/t2_effnet_b0_cc4_ours", "data.image_size=64"])
    assert (cfg.recipe.lr, cfg.recipe.batch_size) == (0.128, 2048)  # 0.016 per 256 images
    model = build_model(cfg)
    drop_paths = [m for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths and max(m.drop_prob for m in drop_paths) <= 0.2 + 1e-9  # linear over blocks up to 0.2
    assert any(m.drop_prob > 0.15 for m in drop_paths)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.eps == 1e-3 and abs(m.momentum - 0.01) < 1e-12 for m in bns)


def test_dy_resnet_rows_use_the_dcd_resnet_command():
    for row in ("dynamicconv/t1_resnet18_dy", "dynamicconv/t1_resnet18_static", "dynamicconv/t1_resnet10_dy"):
        cfg = compose([f"experiment={row}"])
        r = cfg.recipe
        assert (r.name, r.epochs, r.batch_size, r.weight_decay, r.scheduler) == \
            ("imagenet_dy_resnet", 120, 256, 1e-4, "multistep"), row
        assert list(r.decay_milestones) == [30, 60, 90] and cfg.model.dropout == 0.1


def test_every_value_has_a_source_and_extrapolations_say_so():
    name, values, notes = value_sources("dynamicconv/t1_mbv2_w0.5_dy")
    assert name == "imagenet_dy" and all(note for _, note in values.values())
    assert "extrapolated from x1.0" in values["mixup"][1] and "extrapolated from x1.0" in notes["model.dropout"]
    _, values, _ = value_sources("condconv/t2_effnet_b0_cc4_ours")
    assert "0.016 per 256" in values["lr"][1]
    assert values["cutmix"][1] == "base (project default)"
    _, values, _ = value_sources("dynamicconv/t1_resnet18_dy")
    assert "DY-Conv paper" in values["temperature"][1]
    page = render_page(["dynamicconv/t1_resnet18_dy", "dynamicconv/t1_resnet18_static"])
    assert "## `imagenet_dy_resnet`" in page and "| decay_milestones | `[30, 60, 90]` |" in page
