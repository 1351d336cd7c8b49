"""Params / MAdds: exact counts on single layers, the published static MobileNetV2 table, the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from dyconv_repro.analysis.complexity import complexity_report, count_madds, count_params
from dyconv_repro.cli import complexity as cli
from dyconv_repro.models import BACKBONES
from dyconv_repro.ops import OPS, build_op

REPO = Path(__file__).resolve().parents[1]


def test_exact_counts_of_conv_and_linear():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=True), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    assert count_params(conv) == 8 * 3 * 9 + 8 + 8 * 5 + 5
    # 16x16 output x 8 channels x 27 MACs + 8x5 classifier; ReLU, pooling and bias adds are free
    assert count_madds(conv, 32) == 16 * 16 * 8 * 27 + 40
    conv.train()
    count_madds(conv, 32)
    assert conv.training  # mode restored


@pytest.mark.parametrize("width,params_m,madds_m", [(1.0, 3.5, 300), (0.75, 2.6, 209), (0.5, 2.0, 97),
                                                    (0.35, 1.7, 59)])
def test_static_mobilenet_v2_matches_the_published_table(width, params_m, madds_m):
    model = BACKBONES.get("mobilenet_v2")({"width_mult": width}, 1000, 224)
    params, madds = count_params(model) / 1e6, count_madds(model, 224) / 1e6
    assert abs(params - params_m) / params_m <= 0.02, params
    assert abs(madds - madds_m) / madds_m <= 0.03, madds


@pytest.mark.parametrize("op,kwargs,k", [("condconv", {"num_experts": 4}, 4), ("dynamicconv", {"num_kernels": 4}, 4)])
def test_kernel_aggregation_is_counted(op, kwargs, k):
    if op not in OPS:
        pytest.skip(f"operator {op} does not exist yet")
    layer = build_op(op, 16, 32, 3, **kwargs)
    static = count_madds(nn.Conv2d(16, 32, 3, padding=1, bias=False), 8, in_chans=16)
    weights = 32 * 16 * 9
    assert count_madds(layer, 8, in_chans=16) >= static + k * weights  # K MAdds per kernel weight per sample


def test_deploy_counts_refconv():
    if "refconv" not in OPS:
        pytest.skip("refconv does not exist yet")
    from dyconv_repro.models import swap_convs

    base = BACKBONES.get("resnet20")({}, 10, 32)
    ref = complexity_report(base, 32)
    assert ref["params"] == ref["deploy_params"] and ref["madds"] == ref["deploy_madds"]
    swap_convs(base, "refconv", "refconv", {"init": "zero"})
    rep = complexity_report(base, 32)
    # training form: frozen basis (a buffer) + refocusing conv, whose kernel transform costs MAdds
    assert rep["madds"] > ref["madds"]
    assert (rep["deploy_params"], rep["deploy_madds"]) == (ref["params"], ref["madds"])


def test_cli_config_and_layers(capsys):
    cli.main(["model=resnet20", "op=se", "--layers"])
    out = capsys.readouterr().out
    assert "layer1.0.conv1" in out and "replaced 18 of 19 convs" in out
    ref = complexity_report(BACKBONES.get("resnet20")({}, 10, 32), 32)
    assert "MAdds" in out and "model=resnet20 op=se policy=se" in out
    cli.main(["model=resnet20"])
    out = capsys.readouterr().out
    assert f"params {ref['params'] / 1e6:.2f}M  MAdds {ref['madds'] / 1e6:.2f}M" in out


def test_cli_errors_and_missing_paper(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["model=no_such_model"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--paper", "no_such_paper"])
    assert e.value.code == 0 and "nothing to compare" in capsys.readouterr().err


def _expected_rows():
    for path in sorted((REPO / "results" / "expected").glob("*.yaml")):
        for row in (yaml.safe_load(path.read_text()) or {}).get("rows", []):
            if row.get("params_m") is not None or row.get("madds_m") is not None:
                yield row


# One cheap row with published numbers per paper that has any (structured / refconv publish none); the
# slow test below checks every row.
FAST_ROWS = ("condconv/t1_mbv2_cc8", "dynamicconv/t1_mbv2_w0.35_dy", "dynet/t1_dy_shuffle", "weightnet/t3_w0.5_cc2x",
             "mixconv/t1_mixnet_s", "odconv/t1_mbv2_w0.5_od4x", "kernelwarehouse/t2_mbv2_w0.5_kw4x",
             "dynamicconv/t1_resnet10_dy")


def _check_row(row):
    """Build the row's model from its experiment config and compare params / MAdds the way dyconv-complexity
    does (the row's convention, then 2 % / 3 % or the row's widened tolerance): ok, unless the row says why it
    is a `mismatch`, in which case it must still be off."""
    from dyconv_repro.results.expected import check_counts

    overrides = [f"experiment={row['id']}"]
    cfg = cli.compose(overrides)
    assert int(cfg.data.image_size) == int(row.get("image_size", 224)), "config and expected row disagree on resolution"
    torch.manual_seed(0)
    checks = check_counts(row, cli.row_counts(row, cli.measure(cfg), overrides))
    assert checks, f"{row['id']}: no published count to check"
    text = "; ".join(f"{c['field']} {c['ours']:.2f} vs {c['published']} (tolerance {c['pct']} %)" for c in checks)
    if row.get("mismatch"):
        assert not all(c["ok"] for c in checks), f"{row['id']} matches now ({text}): remove its `mismatch`"
    else:
        assert all(c["ok"] for c in checks), f"{row['id']}: {text}"


def test_fast_rows_cover_every_paper_with_numbers():
    rows = {r["id"]: r for r in _expected_rows()}
    assert set(FAST_ROWS) <= set(rows)
    assert {i.split("/")[0] for i in rows} == {i.split("/")[0] for i in FAST_ROWS}


@pytest.mark.parametrize("row_id", FAST_ROWS)
def test_expected_params_and_madds_one_row_per_paper(row_id):
    _check_row(next(r for r in _expected_rows() if r["id"] == row_id))


@pytest.mark.slow
@pytest.mark.parametrize("row", [pytest.param(r, id=r["id"]) for r in _expected_rows()])
def test_expected_params_and_madds(row):
    """The published params/MAdds of every experiment row, within the row's tolerance (results/expected)."""
    _check_row(row)


def test_counts_a_trainable_basis_and_leaves_requires_grad_alone():
    """RefConv with a jointly trained basis (an ablation row): counting used to fail in FlopCounterMode."""
    if "refconv" not in OPS:
        pytest.skip("refconv does not exist yet")
    from dyconv_repro.models import swap_convs

    model = BACKBONES.get("resnet20")({}, 10, 32)
    swap_convs(model, "refconv", "refconv", {"basis": "random", "train_basis": True})
    flags = [p.requires_grad for p in model.parameters()]
    rep = complexity_report(model, 32)
    assert rep["madds"] > rep["deploy_madds"] > 0
    assert [p.requires_grad for p in model.parameters()] == flags


@pytest.mark.parametrize("row_id", ["dynamicconv/t1_resnet18_dy", "dynamicconv/t1_resnet10_dy"])
def test_dy_resnet_keeps_projection_shortcuts_static_and_lands_on_the_published_params(row_id):
    """Issue #22 item 2: the published DY-ResNet params (in 2^20 units) fit static 1x1 projection shortcuts."""
    from dyconv_repro.models.build import build_model_with_report

    row = next(r for r in _expected_rows() if r["id"] == row_id)
    cfg = cli.compose([f"experiment={row_id}", "data.image_size=64"])
    model, reports = build_model_with_report(cfg, verbose=False)
    shortcuts = [r for r in reports if ".downsample." in r.name]
    assert shortcuts and not any(r.replaced for r in shortcuts)
    assert sum(r.replaced for r in reports) > 0
    params_mi = count_params(model) / 2 ** 20
    assert abs(params_mi / row["params_m"] - 1) <= 0.02, (row_id, params_mi, row["params_m"])


def _row(**kw):
    return {"id": "p/r", "provenance": "published", "params_m": 10.0, "madds_m": 100.0,
            "tolerance": {"params_pct": 2, "madds_pct": 3}, **kw}


def test_conventions_are_applied_before_the_default_tolerance():
    from dyconv_repro.results.expected import check_counts, status_text

    mi = 2 ** 20
    plain = check_counts(_row(), {"params_m": 10.0 * mi, "madds_m": 100e6})
    assert status_text(plain) == "params off madds ok"  # 10.49M vs 10.0 is +4.9 %
    units = check_counts(_row(convention={"units": {"params_m": "Mi"}}), {"params_m": 10.0 * mi, "madds_m": 100e6})
    assert status_text(units) == "params ok madds ok" and all(c["default_ok"] for c in units)
    both = check_counts(_row(convention={"units": "Mi"}), {"params_m": 10.0 * mi, "madds_m": 100e6})
    assert status_text(both) == "params ok madds off"  # 100e6 / 2^20 = 95.4, -4.6 %
    wide = check_counts(_row(tolerance={"params_pct": 6, "reason": "x"}), {"params_m": 10.5e6, "madds_m": None})
    assert [(c["ok"], c["default_ok"], c["widened"]) for c in wide] == [(True, False, True)]


@pytest.mark.parametrize("bad,msg", [({"provenance": "guessed"}, "provenance"),
                                     ({"tolerance": {"params_pct": 5}}, "without a tolerance.reason"),
                                     ({"convention": {"units": "G"}}, "convention.units"),
                                     ({"convention": {"count": "fused"}}, "convention.count"),
                                     ({"convention": {"count": "static_twin", "twin": "op=conv"}}, "convention.twin"),
                                     ({"convention": {"scale": 2}}, "convention keys")])
def test_row_metadata_errors_are_one_line(bad, msg):
    from dyconv_repro.errors import UserError
    from dyconv_repro.results.expected import validate_row

    with pytest.raises(UserError) as e:
        validate_row(_row(**bad))
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_closing_note_counts_default_passes_and_lists_widenings():
    from dyconv_repro.results.expected import check_counts

    def result(row, params):
        checks = check_counts(row, {"params_m": params, "madds_m": None})
        return {"row": row, "checks": checks, "status": "", "notes": []}

    results = {"p": [result(_row(), 10.1e6), result(_row(id="p/w", tolerance={"params_pct": 6, "reason": "digitized"}),
                                                    10.5e6), result(_row(id="p/o"), 12e6)]}
    note = cli.closing_note(results)
    assert note[0].startswith("1 of 3 rows") and "1 only through a widened tolerance, 1 off" in note[0]
    assert note[1:] == ["- widened p/w (params 6 %): digitized"]
