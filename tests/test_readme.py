"""README's generated sections: the updater, and that the shipped README has them filled in."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dyconv_repro.errors import UserError
from dyconv_repro.results.readme import README, update_section


def test_update_section_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN t -->\nold\n<!-- END t -->\noutro $1 \\1\n")
    update_section("t", "| a |\n| 1 $1 \\1 |\n", readme)
    assert readme.read_text() == "intro\n<!-- BEGIN t -->\n| a |\n| 1 $1 \\1 |\n<!-- END t -->\noutro $1 \\1\n"
    with pytest.raises(UserError, match="no '<!-- BEGIN other -->'"):
        update_section("other", "x", readme)


@pytest.mark.parametrize("name,must_contain", [("paper_matrix", "| paper |"), ("demo_table", "| op |")])
def test_shipped_readme_sections_are_generated_tables(name, must_contain):
    text = Path(README).read_text()
    m = re.search(rf"<!-- BEGIN {name} -->\n(.*?)<!-- END {name} -->", text, re.DOTALL)
    assert m, f"README lost its {name} markers"
    assert must_contain in m.group(1), f"README's {name} section holds no generated table"


def test_readme_benchmark_summary_is_the_pages_summary():
    """README quotes the shipped benchmark pages exactly: its section == the summary rendered from them."""
    from dyconv_repro.analysis.bench_summary import SECTION, summary

    text = Path(README).read_text()
    m = re.search(rf"<!-- BEGIN {SECTION} -->\n(.*?)\n<!-- END {SECTION} -->", text, re.DOTALL)
    assert m, "README lost its bench_summary markers"
    assert m.group(1) == summary(Path(README).parent / "results" / "benchmarks").strip()


def test_benchmark_summary_lists_rows_and_missed_targets(tmp_path):
    import json

    from dyconv_repro.analysis.bench_summary import summary

    rows = [{"group": "m@32", "label": "conv", "kind": "static"},
            {"group": "m@32", "label": "dynamicconv", "kind": "op", "train_ips_ratio": 0.71, "b1_ms_ratio": 1.42,
             "bN_ips_ratio": float("nan")}]
    targets = [{"group": "m@32", "label": "dynamicconv", "figure": "b1_ms_ratio", "value": 1.42,
                "target": "<= 1.30", "met": False},
               {"group": "m@32", "label": "dynamicconv", "figure": "train_ips_ratio", "value": 0.71,
                "target": ">= 0.70", "met": True}]
    (tmp_path / "cpu_m.json").write_text(json.dumps({"meta": {"date": "D"}, "rows": rows, "targets": targets}))
    (tmp_path / "ops.json").write_text("[]")  # not a model page: ignored
    text = summary(tmp_path)
    assert "| m@32 | dynamicconv | 0.71× | 1.42× | - |" in text and "| conv |" not in text
    assert "**1 met, 1 missed**" in text and "b1_ms_ratio = 1.420 (target <= 1.30)" in text
    with pytest.raises(UserError, match="no model benchmark pages"):
        summary(tmp_path / "empty")
