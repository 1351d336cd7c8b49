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
    for r in rows:
        validate_row(r)
    return doc


def tables_of(doc: dict) -> list[str]:
    """Table keys in file order."""
    return list(dict.fromkeys(r["table"] for r in doc["rows"]))


# ------------------------------------------------------------------------------- row metadata and the check
# provenance: where a row's numbers come from. published = printed in the paper's (or its official code's)
# table; digitized = read off a figure; inferred = computed from printed numbers (`derived`); project-defined
# = the paper prints none, the row is this project's operating point.
PROVENANCES = ("published", "digitized", "inferred", "project-defined")
# convention: how the paper counted, applied to our count before comparing. units: "M" = 10^6, "Mi" = 2^20
# (one string for both numbers or a mapping per number); count: "model" = the model as built, "static_twin" =
# the same row composed with the overrides `twin` (default op=conv; DyNet's nets: model.kwargs.dynamic=false),
# because DyNet counts the fused static convs + FC, not the coefficient predictors and the kernel fusion.
UNITS = {"M": 1e6, "Mi": float(2 ** 20)}
COUNTS = ("model", "static_twin")
COUNTED = ("params_m", "madds_m")
DEFAULT_PCT = {"params_m": 2.0, "madds_m": 3.0}
_TOL_KEY = {"params_m": "params_pct", "madds_m": "madds_pct"}
_LABEL = {"params_m": "params", "madds_m": "MAdds"}


def row_units(row: dict) -> dict[str, str]:
    """{params_m: unit, madds_m: unit} of the row's convention (default M)."""
    units = (row.get("convention") or {}).get("units", "M")
    units = {k: units for k in COUNTED} if isinstance(units, str) else {k: units.get(k, "M") for k in COUNTED}
    bad = sorted({u for u in units.values() if u not in UNITS})
    if bad:
        raise UserError(f"{row.get('id')}: convention.units {bad} unknown; valid: {', '.join(UNITS)}")
    return units


def row_count(row: dict) -> str:
    count = (row.get("convention") or {}).get("count", "model")
    if count not in COUNTS:
        raise UserError(f"{row.get('id')}: convention.count {count!r} unknown; valid: {', '.join(COUNTS)}")
    return count


def twin_overrides(row: dict) -> list[str]:
    """The overrides that turn the row into its static twin (convention.twin, default op=conv)."""
    twin = (row.get("convention") or {}).get("twin", ["op=conv"])
    if not isinstance(twin, list) or not twin or not all(isinstance(t, str) and "=" in t for t in twin):
        raise UserError(f"{row.get('id')}: convention.twin must be a list of key=value overrides, got {twin!r}")
    return list(twin)


def row_tolerance(row: dict) -> dict[str, float]:
    """Percent tolerance per counted number: 2 % params / 3 % MAdds unless the row widens it with a reason."""
    tol = row.get("tolerance") or {}
    return {k: float(tol.get(_TOL_KEY[k], DEFAULT_PCT[k])) for k in COUNTED}


def widenings(row: dict) -> dict[str, float]:
    """The counted numbers whose tolerance is wider than the default."""
    return {k: pct for k, pct in row_tolerance(row).items() if pct > DEFAULT_PCT[k]}


def validate_row(row: dict) -> None:
    """One-line UserError for metadata the checker cannot apply (unknown provenance/convention, a widening
    without `tolerance.reason`, a `mismatch` note that is not text)."""
    rid = row.get("id")
    if row.get("provenance") not in PROVENANCES:
        raise UserError(f"{rid}: provenance {row.get('provenance')!r} is not one of {', '.join(PROVENANCES)}")
    unknown = sorted(set(row.get("convention") or {}) - {"units", "count", "twin"})
    if unknown:
        raise UserError(f"{rid}: convention keys {unknown} unknown; valid: units, count, twin")
    row_units(row)
    if row_count(row) == "static_twin":
        twin_overrides(row)
    if widenings(row) and not str((row.get("tolerance") or {}).get("reason") or "").strip():
        raise UserError(f"{rid}: tolerance {widenings(row)} is wider than 2 % params / 3 % MAdds without a "
                        "tolerance.reason")
    if row.get("mismatch") is not None and not str(row["mismatch"]).strip():
        raise UserError(f"{rid}: mismatch must say why the counts miss")


def convention_text(row: dict) -> str:
    """The row's convention in words ('' for the plain count in millions)."""
    parts = []
    units = row_units(row)
    for k in COUNTED:
        if units[k] != "M" and row.get(k) is not None:
            parts.append(f"{_LABEL[k]} in 2^20 units")
    if row_count(row) == "static_twin":
        parts.append(f"counted on the static twin ({' '.join(twin_overrides(row))}: the static convs + FC)")
    return "; ".join(parts)


def check_counts(row: dict, counts: dict[str, float | None]) -> list[dict]:
    """Compare raw counts ({params_m: n, madds_m: n}, plain numbers) with the row's published ones after the
    row's units; one dict per published number: field, ours (in the row's units), published, pct, ok, widened."""
    units, tol, wide = row_units(row), row_tolerance(row), widenings(row)
    out = []
    for k in COUNTED:
        published, raw = row.get(k), counts.get(k)
        if published in (None, 0) or raw is None:
            continue
        ours = raw / UNITS[units[k]]
        out.append(dict(field=k, ours=ours, published=published, pct=tol[k], ok=matches_published(ours, published, tol[k]),
                        default_ok=matches_published(ours, published, DEFAULT_PCT[k]), widened=k in wide))
    return out


def status_text(checks: list[dict]) -> str:
    """'params ok madds off' (empty when the row publishes no count)."""
    return " ".join(f"{'params' if c['field'] == 'params_m' else 'madds'} {'ok' if c['ok'] else 'off'}" for c in checks)
