"""Smoke tests of the model benchmark: tiny CIFAR ResNet-20, one round; no timing assertions."""

from __future__ import annotations

import csv
import json
import math

import pytest

from dyconv_repro.analysis import bench_model
from dyconv_repro.cli import bench
from dyconv_repro.errors import UserError

TINY = ["--batch", "4", "--infer-batch", "2", "--repeats", "1", "--quick", "--threads", "1"]


def test_model_bench_rows_ratios_and_outputs(tmp_path, capsys):
    out = bench.main(["model", "--models", "resnet20@32", "--ops", "conv,dynamicconv:num_kernels=2,refconv", *TINY,
                            "--out", str(tmp_path / "res"), "--write-page", "tiny", "--page-dir", str(tmp_path)])
    rows = {r["label"]: r for r in out["rows"]}
    # static first, the op, the reparameterizable op and its deployed form; no deploy row for DY-Conv
    assert list(rows) == ["conv", "dynamicconv:num_kernels=2", "refconv", "refconv[deploy]"]
    static = rows["conv"]
    for col, _ in bench_model.FIGURES:
        assert static[f"{col}_ratio"] == 1.0  # the static model against itself, exactly
    for r in rows.values():
        assert r["b1_ms"] > 0 and r["bN_ips"] > 0 and r["image_size"] == 32
        assert math.isclose(r["b1_ms_ratio"], r["b1_ms"] / static["b1_ms"])
        assert math.isclose(r["bN_ips_ratio"], r["bN_ips"] / static["bN_ips"])
    assert math.isclose(rows["refconv"]["train_ips_ratio"], rows["refconv"]["train_ips"] / static["train_ips"])
    dep = rows["refconv[deploy]"]
    assert dep["kind"] == "deploy" and math.isnan(dep["train_ips"])  # inference only
    assert dep["params"] == static["params"] and dep["madds"] == static["madds"]  # the plain architecture
    assert rows["dynamicconv:num_kernels=2"]["params"] > static["params"]

    with open(tmp_path / "res.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["label"] for r in table] == list(rows)
    assert {"train_ips_ratio", "b1_ms_ratio", "bN_ips_ratio", "train_peak_mb_ratio"} <= set(table[0])
    assert float(table[0]["b1_ms_ratio"]) == 1.0
    data = json.loads((tmp_path / "res.json").read_text())
    assert data["meta"]["hardware"]["torch"] and data["meta"]["settings"]["threads"] == 1
    assert any(c["label"] == "dynamicconv:num_kernels=2" and c["figure"] == "train_ips_ratio"
               for c in data["targets"])
    page = (tmp_path / "tiny.md").read_text()
    assert "dyconv-bench model" in page and "refconv[deploy]" in page and "load average" in page
    assert data["meta"]["settings"]["cpu_heap"] == "keep"  # the default, as the trainer's on CPU
    assert "; CPU heap keep: glibc keeps freed memory" in page or "; CPU heap allocator default (not glibc" in page
    assert (tmp_path / "tiny.csv").is_file()
    assert "refconv[deploy]" in capsys.readouterr().out


def test_config_mode_adds_the_static_model():
    cases = bench_model.plan_cases(None, None, ["model=resnet20", "op=condconv", "op.kwargs.num_experts=4",
                                                "policy=condconv"], None, None, peers=False)
    assert [c.kind for c in cases] == ["static", "op"]
    assert cases[0].overrides == ["model=resnet20", "op=conv"] and cases[0].image_size == 32
    assert cases[1].label == "condconv:num_experts=4:policy=condconv"
    peers = bench_model.plan_cases("resnet18", "conv", [], 224, None, peers=True)
    labels = [(c.group, c.label) for c in peers]
    assert ("efficientnet_b0@224", "timm:efficientnet_cc_b0_4e") in labels
    assert ("mobilenet_v2@224", "timm:mixnet_s") in labels and ("mobilenet_v2@224", "conv") in labels
    assert peers[0].num_classes == 1000


def test_token_parsing_and_errors(capsys):
    assert bench_model.split_top("a,mixconv:kernel_sizes=[3,5,7],b") == ["a", "mixconv:kernel_sizes=[3,5,7]", "b"]
    name, ov, size = bench_model.parse_token("resnet20@64:width_mult=0.5", "model")
    assert (name, ov, size) == ("resnet20", ["model=resnet20", "model.width_mult=0.5"], 64)
    with pytest.raises(UserError):
        bench_model.parse_token("resnet20@x", "model")
    with pytest.raises(UserError):
        bench_model.plan_cases(None, "conv", [], None, None, peers=False)
    with pytest.raises(SystemExit) as e:
        bench.main(["model", "model=resnet20", "op=nope", *TINY])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        bench.main(["model", "model=resnet20", "--readme", *TINY])  # the summary is rendered from pages
    assert e.value.code == 2 and "--readme needs --write-page" in capsys.readouterr().err
