"""Every paper-table row instantiates: model built from its experiment config, params counted, one
forward at low resolution. One row per paper in the fast suite, every row in the slow one.

Params do not depend on the resolution, so the count is also checked against the row's published
params (within its tolerance) where the expected file has one.
"""

from __future__ import annotations

import pytest
import torch

from dyconv_repro.analysis.complexity import count_params
from dyconv_repro.config import compose
from dyconv_repro.models.build import build_model
from dyconv_repro.results.expected import PAPERS, check_counts, load_expected, row_count

ROWS = {r["id"]: r for p in PAPERS for r in load_expected(p)["rows"]}
FAST = sorted({rid.split("/")[0]: rid for rid in sorted(ROWS, reverse=True)}.values())  # first row of each paper


def _instantiate(row_id: str) -> None:
    row = ROWS[row_id]
    size = 32 if int(row.get("image_size", 224)) <= 32 else 64
    cfg = compose([f"experiment={row_id}", f"data.image_size={size}"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    params = count_params(model)
    assert params > 0
    if row.get("params_m") is not None and row_count(row) == "model":  # the row's units and tolerance
        (check,) = check_counts(row, {"params_m": params})
        assert check["ok"] or row.get("mismatch"), (row_id, check["ours"], row["params_m"])
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, int(cfg.data.num_classes)), (row_id, tuple(out.shape))
    assert torch.isfinite(out).all(), row_id


def test_fast_rows_cover_every_paper():
    assert {r.split("/")[0] for r in FAST} == set(PAPERS)


@pytest.mark.parametrize("row_id", FAST)
def test_one_row_per_paper_instantiates(row_id):
    _instantiate(row_id)


@pytest.mark.slow
@pytest.mark.parametrize("row_id", sorted(set(ROWS) - set(FAST)))
def test_every_row_instantiates(row_id):
    _instantiate(row_id)
