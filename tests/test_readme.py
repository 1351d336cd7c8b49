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
