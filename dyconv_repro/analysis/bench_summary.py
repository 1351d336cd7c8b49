"""README's benchmark summary, rendered from the generated model pages (`results/benchmarks/*.json`).

`dyconv-bench model --write-page NAME --readme` writes its page and then refreshes README's
`bench_summary` section from *every* model page in the page directory, so the figures README quotes
are the pages' own (same run, same ratios), never copied by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from dyconv_repro.errors import UserError

SECTION = "bench_summary"


def load_pages(page_dir: str | Path) -> list[tuple[str, dict]]:
    """(name, page json) of every model page (a json with rows and targets), by name."""
    out = []
    for f in sorted(Path(page_dir).glob("*.json")):
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "rows" in data and "targets" in data:
            out.append((f.stem, data))
    if not out:
        raise UserError(f"no model benchmark pages (*.json from dyconv-bench model --write-page) in {page_dir}")
    return out


def _x(value) -> str:
    return "-" if value is None or value != value else f"{value:.2f}×"


def summary(page_dir: str | Path, link_prefix: str = "results/benchmarks/") -> str:
    """Markdown: one row per non-static model of every page (ratios to its static model), then the
    issue-7 targets of those pages, met and missed."""
    pages = load_pages(page_dir)
    lines = ["| page (measured) | model | op | train img/s | batch-1 latency | large-batch img/s |",
             "|---|---|---|---:|---:|---:|"]
    checks = []
    for name, data in pages:
        first = f"[{name}]({link_prefix}{name}.md) ({data['meta']['date']})"
        for r in data["rows"]:
            if r["kind"] == "static":
                continue
            page_cell, first = first, ""
            lines.append(f"| {page_cell} | {r['group']} | {r['label']} | "
                         f"{_x(r.get('train_ips_ratio'))} | {_x(r.get('b1_ms_ratio'))} | {_x(r.get('bN_ips_ratio'))} |")
        checks += [(name, c) for c in data["targets"]]
    met = [c for _, c in checks if c["met"]]
    missed = [(n, c) for n, c in checks if not c["met"]]
    lines += ["", "Ratios are to the static model (op=conv) of the same backbone in the same run; peers rows to "
              "their own static backbone. Issue-7 targets on these pages: "
              f"**{len(met)} met, {len(missed)} missed**" + (":" if missed else ".")]
    lines += [f"- {n}: {c['group']} {c['label']} {c['figure']} = {c['value']:.3f} (target {c['target']})"
              for n, c in missed]
    return "\n".join(lines)
