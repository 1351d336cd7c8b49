"""DY-Conv's attention-at-inference ablation (paper Sec. "attention at inference", TABLES.md: average kernels 36.0,
argmax 0.1, shuffled within / across images 14.8 / 27.3, dynamic only at some resolutions 67.0 / 42.5) and
`trainer.evaluate_only`, which evaluates a trained model with such a change without training it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dyconv_repro.errors import UserError
from dyconv_repro.ops import build_op
from dyconv_repro.pipeline import train_run as train


def _op(**kwargs):
    torch.manual_seed(0)
    op = build_op("dynamicconv", 8, 12, 3, num_kernels=4, temperature=1.0, **kwargs)
    with torch.no_grad():  # a peaked attention, so that learned, average and argmax differ
        for p in op.attention.parameters():
            p.mul_(8.0)
    return op.eval()


def _learned_pi(op, x):
    mode, sizes = op.inference_attention, op.inference_dynamic_sizes
    op.inference_attention, op.inference_dynamic_sizes = "learned", None
    try:
        return op.attention_weights(x)
    finally:
        op.inference_attention, op.inference_dynamic_sizes = mode, sizes


X = torch.randn(5, 8, 6, 6)


def test_average_is_the_mean_kernel_and_argmax_one_kernel():
    op = _op(inference_attention="average")
    w, _ = op.kernel(X)
    assert torch.allclose(w, op.weight.mean(0).expand_as(w), atol=1e-6)
    op = _op(inference_attention="argmax")
    pi = _learned_pi(op, X)
    w, _ = op.kernel(X)
    for i, k in enumerate(pi.argmax(1).tolist()):
        assert torch.allclose(w[i], op.weight[k], atol=1e-6)


def test_shuffles_permute_the_learned_attention():
    op = _op(inference_attention="shuffle_kernels")
    torch.manual_seed(1)
    pi, shuffled = _learned_pi(op, X), op.attention_weights(X)
    assert torch.allclose(pi.sort(1).values, shuffled.sort(1).values) and not torch.allclose(pi, shuffled)
    op = _op(inference_attention="shuffle_images")
    torch.manual_seed(1)
    pi, shuffled = _learned_pi(op, X), op.attention_weights(X)
    rows = {tuple(r) for r in pi.round(decimals=5).tolist()}
    assert {tuple(r) for r in shuffled.round(decimals=5).tolist()} == rows and not torch.allclose(pi, shuffled)


def test_dynamic_sizes_keep_attention_only_at_those_output_widths():
    x = torch.randn(3, 8, 14, 14)
    kept = _op(inference_dynamic_sizes=[14])          # stride 1: output 14 wide -> learned
    assert torch.allclose(kept.attention_weights(x), _learned_pi(kept, x))
    averaged = _op(inference_dynamic_sizes=[7, 28])   # not 14 -> average kernel
    assert torch.allclose(averaged.attention_weights(x), torch.full((3, 4), 0.25))
    strided = build_op("dynamicconv", 8, 12, 3, stride=2, inference_dynamic_sizes=[7]).eval()
    assert not torch.allclose(strided.attention_weights(x), torch.full((3, 4), 0.25))  # 14 -> 7: kept


def test_training_never_ablates_and_batch_one_inference_applies_it():
    op = _op(inference_attention="average").train()
    assert torch.allclose(op.attention_weights(X), _learned_pi(op, X))
    op.eval()
    x1 = X[:1]
    expected = torch.nn.functional.conv2d(x1, op.weight.mean(0), None, op.stride, op.padding)
    with torch.no_grad():
        assert torch.allclose(op(x1), expected, atol=1e-5)   # the CPU batch-1 plan must not bypass the ablation


def test_bad_inference_attention_names_the_choices():
    with pytest.raises(UserError, match="average, argmax"):
        build_op("dynamicconv", 8, 8, 3, inference_attention="mean")


def test_evaluate_only_scores_the_loaded_weights(make_cfg):
    common = ["op=dynamicconv", "trainer.max_steps_per_epoch=2", "recipe.batch_size=32"]
    trained = train(make_cfg(*common, "trainer.epochs=1", "run_name=trained"))
    same = train(make_cfg(*common, "trainer.evaluate_only=true", f"model.init_from={trained['run_dir']}",
                          "run_name=again"))
    assert same["status"] == "finished" and same["evaluate_only"] and same["epochs"] == 0 and same["steps"] == 0
    assert same["final_top1"] == pytest.approx(trained["final_top1"])  # the same weights, the same val set
    rows = [json.loads(line) for line in (Path(same["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["val_top1"] == pytest.approx(same["final_top1"])
    ablated = train(make_cfg(*common, "trainer.evaluate_only=true", f"model.init_from={trained['run_dir']}",
                             "+op.kwargs.inference_attention=average", "run_name=average"))
    assert ablated["status"] == "finished" and ablated["final_top1"] is not None


def test_evaluate_only_without_weights_is_refused_and_leaves_no_run_dir(make_cfg, tmp_path):
    with pytest.raises(UserError, match="model.init_from"):
        train(make_cfg("op=dynamicconv", "trainer.evaluate_only=true", "run_name=nothing"))
    assert not (tmp_path / "runs" / "nothing").exists()
