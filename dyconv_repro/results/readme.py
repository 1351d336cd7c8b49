"""Generated sections of README.md.

A command that renders a table (`dyconv-complexity --paper all --write --readme`, `scripts/demo.py
--readme`) also refreshes its copy in README, between `<!-- BEGIN name -->` and `<!-- END name -->`, so
the numbers README shows are always the ones a command in this repo produced, never typed by hand.
"""

from __future__ import annotations

import re
from pathlib import Path

from dyconv_repro.errors import UserError

README = Path(__file__).resolve().parents[2] / "README.md"


def update_section(name: str, body: str, readme: Path | str = README) -> Path:
    """Replace the text between the `name` markers in `readme` with `body`; fails if the markers are missing."""
    path = Path(readme)
    if not path.is_file():
        raise UserError(f"--readme: {path} does not exist (run from a source checkout)")
    text = path.read_text()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise UserError(f"--readme: {path} has no '{begin}' ... '{end}' section")
    path.write_text(pattern.sub(lambda _: f"{begin}\n{body.strip()}\n{end}", text, count=1))
    return path
