"""The published numbers of every paper-table row (results/expected/<paper>.yaml).

Each file is the oracle for one paper: one entry per configs/experiment/<paper>/<row>.yaml with the
published params / MAdds / top-1, where the number comes from (TABLES.yaml source key) and how close
a reproduction has to be. Numbers are copied from ../shared/papers/TABLES.yaml and never typed in.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError


def paper_names() -> tuple[str, ...]:
    """The papers with table rows: one folder each under configs/experiment/ (a new paper is a new folder)."""
    root = Path(config_dir()) / "experiment"
    return tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))))


PAPERS = paper_names()
NUMBERS = ("params_m", "madds_m", "top1", "top1_alt", "top1_err")


def rounding_half_unit(published: float | int) -> float:
    """Half a unit of the last digit a paper printed: "1.4" (M params) stands for anything in [1.35, 1.45)."""
    text = repr(published)
    if isinstance(published, int) or "." not in text or "e" in text.lower():
        return 0.5
    return 0.5 * 10.0 ** -len(text.split(".")[1])


def matches_published(ours: float, published: float | int, pct: float) -> bool:
    """Ours (same unit as `published`) agrees with a published number: within `pct` percent, or within the
    rounding of the printed value (papers print params as "1.4M": a 2 % band is narrower than that)."""
    return abs(ours - published) <= max(abs(published) * pct / 100.0, rounding_half_unit(published) + 1e-12)


def repo_root() -> Path:
    """The checkout that holds configs/ and results/ (configs/ is shipped inside a wheel)."""
    return Path(config_dir()).resolve().parent


def expected_dir() -> Path:
    for base in (repo_root(), Path.cwd()):
        if (base / "results" / "expected").is_dir():
            return base / "results" / "expected"
    return repo_root() / "results" / "expected"


def tables_yaml() -> Path:
    """../shared/papers/TABLES.yaml beside the repository (the source every expected number comes from)."""
    return repo_root().parent / "shared" / "papers" / "TABLES.yaml"


def load_expected(paper: str, path: str | Path | None = None) -> dict:
    """The expected file of `paper` as a dict with `rows` (a list of row dicts)."""
    if path is None:
        if paper not in PAPERS:
            raise UserError(f"unknown paper {paper!r}; valid papers: {', '.join(PAPERS)}")
        path = expected_dir() / f"{paper}.yaml"
    path = Path(path)
    if not path.is_file():
        raise UserError(f"expected-results file {path} not found (results/expected/<paper>.yaml of the checkout)")
    doc = yaml.safe_load(path.read_text()) or {}
    rows = doc.get("rows") or []
    ids = [r["id"] for r in rows]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise UserError(f"{path}: duplicate row ids {dup}")
    return doc


def tables_of(doc: dict) -> list[str]:
    """Table keys in file order."""
    return list(dict.fromkeys(r["table"] for r in doc["rows"]))
