"""Every operator exports with a dynamic batch and the exported graph equals eager PyTorch (issue 24).

Grid: every registered operator x {CIFAR ResNet-20, MobileNetV2 0.35} at 32x32, eval mode, random weights, plus
the deployed forms (deploy_transform: RefConv -> conv, Structured -> SumPool + small conv, MixConv -> one
depthwise conv). Each is exported once from a batch-2 example and run at batch 1 and 7: torch.export with a
batch Dim, ONNX from the dynamo exporter in onnxruntime, the legacy TorchScript exporter and torch.jit.trace.
Relative errors are max|got - eager| / max|eager|. The ResNet-20 half is the fast suite; MobileNetV2 and the
repeats with the native kernels suspended are `slow` (the export form never calls them: those runs show that
the eager reference they are compared with may use them or not). `DYCONV_NATIVE=0` itself runs in a subprocess.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import warnings
from contextlib import nullcontext

import pytest
import torch

from dyconv_repro.ops import OPS
from tests.conftest import REPO, native_kernel

pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e .[export]")
pytest.importorskip("onnxscript", reason="the export extra is not installed: pip install -e .[export]")

from dyconv_repro.models import export as ex  # noqa: E402

TOL = 1e-4
SIZE = 32
BACKBONES = {"resnet20": [], "mobilenet_v2": ["model.width_mult=0.35"]}
DEPLOYABLE = ("mixconv", "refconv", "structured")  # ops whose deployed form differs from the training form


def overrides(model: str, op: str) -> list[str]:
    extra = list(BACKBONES[model])
    if op == "mixconv" and model == "resnet20":  # no depthwise conv: MixConv on the dense 3x3 convs (groups=1)
        extra.append("policy.roles=[dense]")
    return extra


@functools.cache
def built(model: str, op: str, deployed: bool):
    """The model (eval, random weights, seed 0); `deployed`: after deploy_transform(decompose='all')."""
    from dyconv_repro.config import compose
    from dyconv_repro.models.build import build_model_with_report
    from dyconv_repro.models.deploy import deploy_transform

    torch.manual_seed(0)
    net = build_model_with_report(compose([f"model={model}", f"op={op}", f"data.image_size={SIZE}",
                                           *overrides(model, op)]), verbose=False)[0].eval()
    return deploy_transform(net, "all") if deployed else net  # the reference is the deployed net's own eager


DYNAMIC = ("condconv", "dynamicconv", "dynet", "weightnet")


def cases(fast=lambda model, op, deployed: True):
    """Every op x backbone (+ deployed forms); `fast(...)` picks the ResNet-20 cases outside the slow suite."""
    for model in BACKBONES:
        for op in OPS.names():
            for deployed in (False, True) if op in DEPLOYABLE else (False,):
                slow = model != "resnet20" or (deployed and op != "structured") or not fast(model, op, deployed)
                yield pytest.param(model, op, deployed, id=f"{model}-{op}{'-deployed' if deployed else ''}",
                                   marks=[pytest.mark.slow] if slow else [])


def onnx_fast(model, op, deployed):
    """ONNX in the fast suite: the forms that were broken (dynamic ops, the SumPool); the static ones are slow."""
    return op in DYNAMIC or (op == "structured" and deployed)


NATIVE = [pytest.param("built", id="native"), pytest.param("suspended", id="native_suspended", marks=pytest.mark.slow)]


@pytest.fixture(params=NATIVE)
def native_mode(request):
    """'built': the native kernels loaded (the eager reference uses them); 'suspended': aten only."""
    from dyconv_repro.ops.cpu import native

    if request.param == "built":
        if native_kernel() is None:
            pytest.skip("no C++ toolchain (or DYCONV_NATIVE=0): the native kernels are not built")
        return nullcontext
    return native.suspended


def inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, SIZE, SIZE, generator=gen) for b in (1, 7)]


def assert_matches(net, run, label: str):
    for x in inputs():
        with torch.no_grad():
            ref = net(x)
        err = ex.compare(ref, run(x))
        assert err["max_rel"] <= TOL, f"{label} at batch {x.shape[0]}: {err}"


def example():
    return torch.randn(ex.EXAMPLE_BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@functools.cache
def program(model: str, op: str, deployed: bool):
    """torch.export of the model as given, batch symbolic: the library must notice the exporter by itself."""
    with torch.no_grad():
        return torch.export.export(built(model, op, deployed), (example(),), dynamic_shapes=({0: ex.batch_dim()},))


@pytest.mark.parametrize("model,op,deployed", cases())
def test_torch_export_takes_any_batch(model, op, deployed, native_mode):
    with native_mode():
        assert_matches(built(model, op, deployed), ex.program_runner(program(model, op, deployed)), "torch.export")


@pytest.mark.parametrize("model,op,deployed", cases(onnx_fast))
def test_onnx_dynamo_takes_any_batch(model, op, deployed, native_mode, tmp_path):
    path = tmp_path / "m.onnx"
    with native_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(program(model, op, deployed), (example(),), str(path), dynamo=True,
                          opset_version=ex.DEFAULT_OPSET, external_data=False, verbose=False)
        assert_matches(built(model, op, deployed), ex.onnx_runner(path), "onnx (dynamo)")


@pytest.mark.parametrize("model,op,deployed", cases())
def test_legacy_onnx_and_jit_trace_match_at_another_batch(model, op, deployed, native_mode, tmp_path):
    """Traced at batch 1 (the case that was silently wrong with the native kernels), run at 1 and 7."""
    net = built(model, op, deployed)
    x1 = torch.randn(1, 3, SIZE, SIZE)
    with native_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            traced = torch.jit.trace(net, x1, check_trace=False)
        assert_matches(net, traced, "jit.trace")
        path = tmp_path / "legacy.onnx"
        torch.onnx.export(net, (x1,), str(path), dynamo=False, input_names=["x"], dynamic_axes={"x": {0: "batch"}})
        assert_matches(net, ex.onnx_runner(path), "onnx (legacy)")


def test_export_path_equals_reference_on_every_geometry():
    """The export path against the per-sample loop: dense, grouped, depthwise (with a multiplier), 1x1 with
    stride, dilation, bias."""
    from dyconv_repro.ops.engine.paths import export_conv2d, loop_conv2d

    torch.manual_seed(0)
    for c_in, c_out, k, stride, pad, dil, groups in [(8, 12, 3, 1, 1, 1, 1), (8, 12, 3, 2, 1, 1, 4),
                                                      (8, 8, 3, 1, 1, 1, 8), (8, 16, 5, 2, 2, 1, 8),
                                                      (8, 12, 1, 2, 0, 1, 1), (8, 8, 3, 1, 2, 2, 2),
                                                      (6, 4, (1, 3), 1, (0, 1), 1, 2)]:
        kh, kw = (k, k) if isinstance(k, int) else k
        x = torch.randn(3, c_in, 9, 10)
        w = torch.randn(3, c_out, c_in // groups, kh, kw)
        b = torch.randn(3, c_out)
        st, pd, dl = (stride, stride), pad if isinstance(pad, tuple) else (pad, pad), (dil, dil)
        for bias in (None, b):
            ref = loop_conv2d(x, w, bias, st, pd, dl, groups)
            torch.testing.assert_close(export_conv2d(x, w, bias, st, pd, dl, groups), ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(export_conv2d(x, w, bias, st, pd, dl, groups, w.shape[1:]), ref,
                                       atol=1e-5, rtol=1e-5)


def test_exporting_is_the_one_switch():
    """Inside export_mode(): the export path whatever was forced, no backend, no native call; outside: unchanged."""
    from dyconv_repro.ops import build_op
    from dyconv_repro.ops.cpu import kernels
    from dyconv_repro.ops.engine import dispatch

    assert not dispatch.exporting() and not dispatch.traced()
    op = build_op("dynamicconv", 8, 8, 3, groups=8).eval()
    x = torch.randn(1, 8, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        eager = op(x)
        with dispatch.export_mode():
            assert dispatch.exporting() and dispatch.traced()
            assert dispatch.backend_for(x) is None and kernels.native_for("depthwise_forward", x) is None
            call = dispatch.ConvCall.of(x, torch.zeros(1, 8, 1, 3, 3), (1, 1), (1, 1), (1, 1), 8)
            assert dispatch.select_path(call) == "export"
            op.path = "loop"
            torch.testing.assert_close(op(x), eager, atol=1e-5, rtol=1e-5)
        op.path = "auto"
        calls = []
        wrapped = ex.prepare_export(op)
        wrapped.model.register_forward_pre_hook(lambda m, a: calls.append(dispatch.exporting()))
        torch.testing.assert_close(wrapped(x), eager, atol=1e-5, rtol=1e-5)
        assert calls == [True]  # the wrapped model ran in its export form
    assert not dispatch.exporting()


def test_jit_trace_with_native_off_in_a_subprocess(tmp_path):
    """DYCONV_NATIVE=0 itself (not only the suspension): a batch-1 trace of DY-Conv ResNet-20 matches at 7."""
    code = (
        "import torch, warnings; warnings.simplefilter('ignore')\n"
        "from dyconv_repro.ops.cpu import native; assert native.status().startswith('off'), native.status()\n"
        "from tests.test_export import built, assert_matches, ex, example\n"
        "net = built('resnet20', 'dynamicconv', False)\n"
        "with torch.no_grad(): tr = torch.jit.trace(net, torch.randn(1, 3, 32, 32), check_trace=False)\n"
        "assert_matches(net, tr, 'jit.trace')\n"
        "assert_matches(net, ex.program_runner(ex.export_program(net, example())), 'torch.export')\n"
        "print('ok')\n")
    env = {**os.environ, "DYCONV_NATIVE": "0", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_mixconv_reparameterizes_to_one_depthwise_conv():
    from dyconv_repro.ops import build_op

    torch.manual_seed(0)
    for kw in ({}, {"dilated": True}, {"kernel_sizes": [3, 5]}):
        op = build_op("mixconv", 12, 12, 3, groups=12, bias=True, **kw).eval()
        conv = op.reparameterize()
        assert type(conv) is torch.nn.Conv2d and conv.groups == 12
        x = torch.randn(2, 12, 11, 11)
        with torch.no_grad():
            torch.testing.assert_close(conv(x), op(x), atol=1e-5, rtol=1e-5)
    dense = build_op("mixconv", 12, 12, 3).eval()  # groups=1: the equal plain conv would be dense: kept
    assert dense.reparameterize() is dense


def _tiny_run(tmp_path, op: str = "dynamicconv"):
    """A run directory as the trainer writes it (config.yaml, checkpoints/last.pt and best.pt), untrained."""
    from omegaconf import OmegaConf

    from dyconv_repro.config import compose
    from dyconv_repro.models.build import build_model

    cfg = compose([f"op={op}", "data.image_size=32"])
    torch.manual_seed(0)
    model = build_model(cfg)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    config = OmegaConf.to_container(cfg, resolve=True)
    torch.save({"model": model.state_dict(), "epoch": 1, "global_step": 1}, run / "checkpoints" / "last.pt")
    torch.save({"model": model.state_dict(), "epoch": 1, "top1": 10.0, "config": config}, run / "checkpoints" / "best.pt")
    return run


def test_cli_exports_and_verifies_a_run(tmp_path, capsys):
    """dyconv-export on a run directory (in process: a fresh interpreter spends ~20 s importing the exporter)."""
    from dyconv_repro.cli.export import export

    run = _tiny_run(tmp_path)
    export([f"ckpt={run}", "format=onnx", "batch=5"])
    assert "verified against PyTorch" in capsys.readouterr().out
    report = json.loads((run / "export" / "export.json").read_text())
    assert report["ok"] and report["format"] == "onnx" and report["opset"] == ex.DEFAULT_OPSET
    assert set(report["errors"]) == {"1", "5"} and all(e["max_rel"] <= TOL for e in report["errors"].values())
    assert report["file_bytes"] == (run / "export" / "model.onnx").stat().st_size
    assert report["node_types"].get("MatMul", 0) > 0 and "Conv" in report["node_types"]


def test_cli_user_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from dyconv_repro.cli.export import export

    for argv, msg in ([["format=onnx"], "usage: dyconv-export"],
                      [[f"ckpt={tmp_path}", "format=tflite"], "format must be one of onnx, torch_export"],
                      [[f"ckpt={tmp_path}", "format=torch_export", "batch=2"], "batch must be > 2"],
                      [[f"ckpt={tmp_path}"], "holds no checkpoints/best.pt or last.pt"]):
        with pytest.raises(SystemExit) as e:
            export(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and err.count("\n") == 1, err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(SystemExit):
        export([f"ckpt={tmp_path}", "format=onnx"])
    assert "pip install -e .[export]" in capsys.readouterr().err


def test_cli_refuses_a_file_that_does_not_match(tmp_path, monkeypatch, capsys):
    """A file whose outputs differ from PyTorch: exit 2, one line, no file left, export.json says why."""
    from dyconv_repro.cli.export import export

    run = _tiny_run(tmp_path, "conv")
    real = ex.program_runner

    def off_by_one(path):
        good = real(path)
        return lambda x: good(x) + 1.0

    monkeypatch.setattr(ex, "program_runner", off_by_one)
    with pytest.raises(SystemExit) as e:
        export([f"ckpt={run}/checkpoints/last.pt", "format=torch_export"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "does not match PyTorch" in err and err.count("\n") == 1
    assert not (run / "export" / "model.pt2").exists()
    assert json.loads((run / "export" / "export.json").read_text())["ok"] is False
