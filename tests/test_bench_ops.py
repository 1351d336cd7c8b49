"""Smoke test of the op benchmark: tiny shapes, every registered op gets a row and a ratio."""

from __future__ import annotations

import math

import pytest

from dyconv_repro.analysis import bench_ops
from dyconv_repro.cli.bench import main
from dyconv_repro.errors import UserError
from dyconv_repro.ops import OPS


def test_bench_ops_rows_and_table(tmp_path):
    shapes = [bench_ops.LayerShape("tiny dw", "dw", 8, 8, 3, 6)]
    rows = bench_ops.run("cpu", threads=1, repeats=1, batch=2, shapes=shapes, formats=("nchw", "cl"),
                         min_block_s=0.0, progress=False)
    labels = {r["label"] for r in rows}
    assert set(OPS.names()) <= labels and {"timm.CondConv2d", "timm.MixedConv2d", "floor.conv[cl]"} <= labels
    assert "refconv[deploy]" in labels and "structured[deploy]" in labels
    for r in rows:
        if not r.get("note"):
            assert r["time_s"] > 0 and math.isclose(r["ratio"], r["time_s"] / r["floor_s"])
            assert r["floor_s"] <= r["time_s"] or r["label"] not in ("floor.conv[nchw]", "floor.conv[cl]")
    table = bench_ops.summarize(rows)
    assert "fwd+bwd b2" in table and "mixconv / static depthwise 7x7" in table
    bench_ops.write_csv(rows, str(tmp_path / "b.csv"))
    assert (tmp_path / "b.csv").read_text().count("\n") == len(rows) + 1


def test_bench_cli_errors():
    with pytest.raises(SystemExit) as e:
        main(["ops", "--ops", "nope", "--quick"])
    assert e.value.code == 2
    with pytest.raises(UserError):
        bench_ops.candidates(["nope"])


def test_ops_page_names_command_hardware_and_holds_the_summary(tmp_path, monkeypatch):
    from dyconv_repro.cli.bench import write_ops_page

    monkeypatch.setattr("sys.argv", ["dyconv-bench", "ops", "--threads", "2"])
    page = tmp_path / "ops.md"
    write_ops_page(str(page), "fwd b1: median 1.10x\n")
    text = page.read_text()
    assert "dyconv-bench ops --threads 2" in text and "torch " in text and "hardware:" in text
    assert "fwd b1: median 1.10x" in text
