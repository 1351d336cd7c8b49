"""Issue 5: each paper's training mechanics does what the paper says, on the offline digits data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dyconv_repro.engine.hooks import annealed_temperature
from dyconv_repro.ops import OPS
from dyconv_repro.pipeline import train_run as train

from .conftest import compose
from .test_train import run_killed_then_resumed


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _last(run_dir) -> dict:
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def test_annealed_temperature_is_a_pure_function_of_the_step():
    kw = dict(steps_per_epoch=10, init=30.0, final=1.0, epochs=10)
    assert annealed_temperature(0, **kw) == 30.0
    assert annealed_temperature(50, **kw) == pytest.approx(15.5)
    assert annealed_temperature(100, **kw) == 1.0 and annealed_temperature(10_000, **kw) == 1.0
    assert annealed_temperature(55, **kw, per="epoch") == annealed_temperature(50, **kw)
    steps = [annealed_temperature(s, **kw) for s in range(101)]
    assert all(a > b for a, b in zip(steps, steps[1:]))  # strictly falling per step
    assert annealed_temperature(7, **{**kw, "init": 5.0, "final": 5.0}) == 5.0  # constant-tau ablation


@pytest.mark.skipif("dynamicconv" not in OPS, reason="dynamicconv not built")
def test_dynamicconv_temperature_anneals_and_resumes_exactly(make_cfg, monkeypatch):
    args = ["op=dynamicconv", "trainer.epochs=3", "trainer.max_steps_per_epoch=3", "recipe.batch_size=32",
            "+recipe.temperature={init: 30, final: 1, epochs: 2, per: step}"]
    full = train(make_cfg(*args, "run_name=full"))
    taus = [r["temperature"] for r in _metrics(full["run_dir"])]
    # logged at the end of epochs 1..3 (the value used by the epoch's last step): falling, then 1
    assert taus[0] < 30 and taus[0] > taus[1] and taus[2] == 1.0, taus
    assert _last(full["run_dir"])["model"]  # tau is a buffer of every dynamic layer
    tau_buffers = [v for k, v in _last(full["run_dir"])["model"].items() if k.endswith("temperature")]
    assert tau_buffers and all(float(t) == 1.0 for t in tau_buffers)
    _, resumed = run_killed_then_resumed(make_cfg, monkeypatch, args, kill_step=4)
    assert [r["temperature"] for r in _metrics(resumed["run_dir"])] == taus
    a, b = _last(full["run_dir"])["model"], _last(resumed["run_dir"])["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k


@pytest.mark.skipif("structured" not in OPS, reason="structured not built")
def test_structural_regularization_then_decomposition(make_cfg):
    from dyconv_repro.cli.deploy import deploy

    # lam 40: the regularizer ||(I - AA+)W|| / ||W|| is scale-free, so its gradient shrinks as 1/||W||; at the
    # backbone's kaiming-normal(fan_out) init (not PyTorch's 2.4x smaller default) 3 epochs need a larger lam
    args = ["op=structured", "trainer.epochs=3", "recipe.batch_size=64", "recipe.lr=0.05",
            "+recipe.structural_reg={lam: 40.0, warmup_epochs: 0, exclude_from_wd: true}"]
    summary = train(make_cfg(*args))
    reg = [r["reg_loss_mean"] for r in _metrics(summary["run_dir"])]
    from dyconv_repro.models.build import build_model
    from dyconv_repro.ops.walkers import regularization_loss, structured_layers

    fresh = build_model(make_cfg(*args))
    initial = regularization_loss(fresh).item() / len(structured_layers(fresh))
    assert reg[-1] * 10 <= initial, (initial, reg)
    report = deploy([f"ckpt={summary['run_dir']}/checkpoints/last.pt", "tolerance=1.0"])
    assert abs(report["top1_after"] - report["top1_before"]) <= 1.0, report
    assert report["params_after"] < report["params_before"]
    assert report["madds_after"] < report["madds_before"]


@pytest.mark.skipif("refconv" not in OPS, reason="refconv not built")
def test_refconv_pipeline_baseline_refocus_deploy(tmp_path):
    from dyconv_repro.engine.checkpoint import load_model_state_strict
    from dyconv_repro.models.build import build_model
    from dyconv_repro.models.deploy import baseline_config
    from dyconv_repro.pipeline import run_pipeline

    overrides = [f"output_dir={tmp_path / 'runs'}", "trainer.progress=false", "op=refconv", "trainer.epochs=2",
                 "trainer.max_steps_per_epoch=4", "recipe.batch_size=32", "+recipe.refocus={freeze_bn: false}",
                 "run_name=refconv_pipe",
                 "+pipeline=[{name: baseline, overrides: ['op=conv', 'recipe.refocus=null']}, "
                 "{name: refocus, init_from: baseline, init_ckpt: last}]"]
    cfg = compose(overrides)
    summary = run_pipeline(cfg, overrides)
    base_dir = next((Path(cfg.output_dir) / "refconv_pipe" / "baseline").glob("*"))
    run_dir = Path(summary["run_dir"])
    assert run_dir.parent.name == "refocus" and summary["status"] == "finished"
    deployed = torch.load(run_dir / "deployed.pt", weights_only=False)
    plain = build_model(baseline_config(cfg))
    load_model_state_strict(plain, deployed["model"])  # strict: the unmodified baseline architecture
    assert sum(p.numel() for p in plain.parameters()) == \
        sum(p.numel() for p in build_model(baseline_config(cfg)).parameters())
    assert summary["deploy"]["max_abs_logit_diff"] < 1e-4 and summary["deploy"]["loads_into_baseline"]
    # the frozen bases are the baseline's kernels, bit for bit, after the refocus stage
    base_sd = _last(base_dir)["model"]
    refocused = _last(run_dir)["model"]
    bases = [k for k in refocused if k.endswith(".weight") and k.replace(".weight", ".convmap.weight") in refocused]
    assert bases
    for k in bases:
        assert torch.equal(refocused[k], base_sd[k]), k


@pytest.mark.skipif("refconv" not in OPS, reason="refconv not built")
def test_refconv_zero_init_starts_at_the_baseline(make_cfg, tmp_path):
    from dyconv_repro.models.build import build_model

    base_cfg = make_cfg("op=conv")
    torch.manual_seed(0)
    baseline = build_model(base_cfg).eval()
    ckpt = tmp_path / "base.pt"
    torch.save({"model": baseline.state_dict()}, ckpt)
    ref = build_model(make_cfg("op=refconv", "op.kwargs.init=zero", f"model.init_from={ckpt}")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ref(x), baseline(x))


# the operators after the seven papers (issue 18): temperature (where the op has one), resume and deploy
AFTER_SEVEN = {"odconv": ["op.kwargs.num_kernels=4", "+recipe.temperature={init: 30, final: 1, epochs: 1, per: step}"],
               "dcd": [],
               "kernelwarehouse": ["+recipe.temperature={init: 1, final: 0, epochs: 1, per: step}"]}


@pytest.mark.parametrize("op", [o for o in AFTER_SEVEN if o in OPS])
def test_new_ops_train_resume_exactly_and_deploy(make_cfg, monkeypatch, op):
    from dyconv_repro.cli.deploy import deploy

    args = [f"op={op}", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", "recipe.batch_size=32",
            *AFTER_SEVEN[op]]
    full = train(make_cfg(*args, "run_name=full"))
    assert full["status"] == "finished"
    if "temperature" in " ".join(AFTER_SEVEN[op]):
        taus = [r["temperature"] for r in _metrics(full["run_dir"])]
        end, start = (1.0, 30.0) if op == "odconv" else (0.0, 1.0)  # tau 30 -> 1; KernelWarehouse t 1 -> 0
        assert end < taus[0] < start and taus[1] == end  # annealed over the first epoch, then held
        tau_buffers = [v for k, v in _last(full["run_dir"])["model"].items() if k.endswith("temperature")]
        assert tau_buffers and all(float(t) == end for t in tau_buffers)
    _, resumed = run_killed_then_resumed(make_cfg, monkeypatch, args, kill_step=4)
    a, b = _last(full["run_dir"])["model"], _last(resumed["run_dir"])["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0), k
    report = deploy([f"ckpt={full['run_dir']}/checkpoints/last.pt", "data=random"])
    assert report["max_abs_logit_diff"] <= 1e-4 and Path(report["saved"]).is_file()
