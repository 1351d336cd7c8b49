"""`dyconv-complexity`: parameters and MAdds (batch 1) of a config, an experiment, or a paper's rows.

    dyconv-complexity model=mobilenet_v2 op=dynamicconv          # any composed config
    dyconv-complexity experiment=dynamicconv/t1_mbv2_w0.5_dy --layers
    dyconv-complexity --paper dynamicconv                         # every row next to the paper
    dyconv-complexity --paper all --write                         # every paper -> results/tables/paper_rows.md

MAdds = FLOPs/2 of torch.utils.flop_counter.FlopCounterMode at batch 1 (convs, matmuls incl. routing
and kernel aggregation; elementwise ops and pooling are free). "deploy" = after re-parameterization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from dyconv_repro.cli.common import user_errors_exit
from dyconv_repro.config import compose
from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError

CONVENTION = ("MAdds = FLOPs/2 at batch 1 (FlopCounterMode: convs + matmuls incl. routing and kernel "
              "aggregation; elementwise ops and pooling free); M = millions")


def measure(cfg, layers: bool = False, decomposed: str | None = None) -> dict:
    """Build the model of `cfg` and count it; prints the layer table when asked. `decomposed` (all | auto) also
    counts the structured layers' SumPool + small-conv form (`decomposed_params` / `decomposed_madds`)."""
    from dyconv_repro.analysis.complexity import complexity_report, count_madds, count_params
    from dyconv_repro.models.build import build_model_with_report
    from dyconv_repro.models.deploy import deploy_transform
    from dyconv_repro.models.surgery import print_layer_table

    model, reports = build_model_with_report(cfg, verbose=False)
    if layers:
        print_layer_table(reports)
    report = complexity_report(model, int(cfg.data.image_size))
    if decomposed:
        form = deploy_transform(model, decomposed)
        report.update(decomposed_params=count_params(form), decomposed_madds=count_madds(form, int(cfg.data.image_size)))
    return report


def _m(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def expected_rows(paper: str) -> list[dict] | None:
    """Rows of results/expected/<paper>.yaml (None when the file is absent, e.g. in an installed wheel)."""
    from dyconv_repro.results.expected import validate_row

    path = Path(config_dir()).parent / "results" / "expected" / f"{paper}.yaml"
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    rows = data.get("rows", []) if isinstance(data, dict) else data
    rows = [r for r in rows if isinstance(r, dict) and r.get("id")]
    for r in rows:
        validate_row(r)
    return rows


def row_counts(row: dict, counts: dict, overrides: list[str]) -> dict:
    """The raw counts the row's convention compares: the model's, or its static twin's (convention.twin)."""
    from dyconv_repro.results.expected import row_count, twin_overrides

    if row_count(row) == "static_twin":
        counts = measure(compose([*overrides, *twin_overrides(row)]))
    return {"params_m": counts["params"], "madds_m": counts["madds"]}


def _check(checks: list[dict], field: str) -> dict | None:
    return next((c for c in checks if c["field"] == field), None)


def _ours(checks: list[dict], field: str, fallback) -> str:
    """Our number as compared (in the row's units and count), or the model's count in millions."""
    c = _check(checks, field)
    return _m(fallback) if c is None else f"{c['ours']:.2f}"


def _delta_of(checks: list[dict], field: str) -> str:
    c = _check(checks, field)
    return "-" if c is None else f"{100.0 * (c['ours'] - c['published']) / c['published']:+.1f}%"


def _widened_text(checks: list[dict]) -> str:
    return ", ".join(f"{'params' if c['field'] == 'params_m' else 'MAdds'} {c['pct']:g} %" for c in checks if c["widened"])


def row_notes(row: dict, checks: list[dict]) -> list[str]:
    """What the status rests on: the convention applied, each widening with its reason, why a row is off."""
    from dyconv_repro.results.expected import convention_text

    notes = []
    if convention_text(row):
        notes.append(f"convention: {convention_text(row)}")
    if any(c["widened"] for c in checks):
        notes.append(f"widened to {_widened_text(checks)}: {row['tolerance']['reason']}")
    if row.get("mismatch"):
        notes.append(f"off: {row['mismatch']}" if any(not c["ok"] for c in checks) else
                     f"marked mismatched but matches now (remove `mismatch`): {row['mismatch']}")
    return notes


def paper_rows(paper: str, image_size: int | None, extra: list[str], echo: bool = True) -> list[dict]:
    """Count every row of results/expected/<paper>.yaml; one dict per row (with `error` when it failed)."""
    from dyconv_repro.results.expected import check_counts, status_text

    rows = expected_rows(paper)
    if rows is None:
        print(f"no results/expected/{paper}.yaml in this checkout; nothing to compare", file=sys.stderr)
        return []
    if echo:
        print(f"# {paper}: {CONVENTION}; a row's convention (2^20 units, static twin) is applied before comparing")
        head = (f"{'experiment':<44} {'params':>7} {'paper':>6} {'delta':>7}  {'MAdds':>8} {'paper':>7} {'delta':>7}"
                f"  {'dep.params':>10} {'dep.MAdds':>9}  status")
        print(head)
        print("-" * len(head))
    out = []
    for row in rows:
        overrides = [f"experiment={row['id']}"] + ([f"data.image_size={image_size}"] if image_size else []) + extra
        try:
            r = measure(compose(overrides))
            checks = check_counts(row, row_counts(row, r, overrides))
        except (UserError, Exception) as e:  # noqa: BLE001 - one bad row must not hide the others
            msg = str(e).splitlines()[0][:150] if str(e) else type(e).__name__
            out.append({"row": row, "error": msg})
            if echo:
                print(f"{row['id']:<44} error: {msg}")
            continue
        out.append({"row": row, "counts": r, "checks": checks, "status": status_text(checks),
                    "notes": row_notes(row, checks)})
        if echo:
            print(f"{row['id']:<44} {_ours(checks, 'params_m', r['params']):>7} {row.get('params_m') or '-':>6} "
                  f"{_delta_of(checks, 'params_m'):>7}  {_ours(checks, 'madds_m', r['madds']):>8} "
                  f"{row.get('madds_m') or '-':>7} {_delta_of(checks, 'madds_m'):>7}  {_m(r['deploy_params']):>10} "
                  f"{_m(r['deploy_madds']):>9}  {out[-1]['status']}", flush=True)
            for note in out[-1]["notes"]:
                print(f"    {note}")
    return out


def summary(results: dict[str, list[dict]]) -> dict:
    """Rows with published counts: how many pass at the default tolerance after conventions, how many only
    through a widened one, how many are off."""
    checked = [r for rows in results.values() for r in rows if r.get("checks")]
    default = [r for r in checked if all(c["default_ok"] for c in r["checks"])]
    widened = [r for r in checked if r not in default and all(c["ok"] for c in r["checks"])]
    off = [r for r in checked if not all(c["ok"] for c in r["checks"])]
    return {"checked": len(checked), "default": len(default), "widened": widened, "off": off}


def closing_note(results: dict[str, list[dict]]) -> list[str]:
    """The count at the default tolerance, then every remaining widening with its reason."""
    s = summary(results)
    lines = [f"{s['default']} of {s['checked']} rows with published counts pass at the default tolerance (2 % params / "
             f"3 % MAdds) after conventions; {len(s['widened'])} only through a widened tolerance, {len(s['off'])} off."]
    for r in s["widened"]:
        lines.append(f"- widened {r['row']['id']} ({_widened_text(r['checks'])}): {r['row']['tolerance']['reason']}")
    return lines


def run_paper(paper: str, image_size: int | None, extra: list[str]) -> int:
    paper_rows(paper, image_size, extra)
    return 0


def papers() -> list[str]:
    """Every paper with an expected-results file."""
    return sorted(p.stem for p in (Path(config_dir()).parent / "results" / "expected").glob("*.yaml"))


def render_page(results: dict[str, list[dict]], command: str) -> str:
    """Markdown: the papers x rows x status matrix, then every row's counts next to the paper's."""
    import platform

    import torch

    lines = ["# Paper rows: configs and complexity check", "",
             "<!-- generated by `dyconv-complexity --paper all --write`; do not edit by hand -->", "",
             f"Command: `{command}` (torch {torch.__version__}, {platform.machine()} CPU; counting needs no data "
             "or GPU). " + CONVENTION + ".", "",
             "`checked` = rows whose published params and/or MAdds our model matches within 2 % params / 3 % MAdds "
             "(or within the rounding of the printed number: 1.4M covers 1.35-1.45M) after the row's convention "
             "(`units: Mi`: the paper counts in 2^20 units; `count: static_twin`: the paper counts the static convs + FC, "
             "so the row is counted with its `twin` overrides); `widened` = of those, rows that pass only through a per-row "
             "tolerance with a written reason (listed below); `off` = outside it (the row's `mismatch` says why, where "
             "known); `unpublished` = the paper gives neither number. Top-1 at paper scale needs the ImageNet/CIFAR runs "
             "(`dyconv-reproduce <paper>` on GPUs); none has been run from this repo yet, so every top-1 is "
             "the paper's only.", "",
             "| paper | tables | rows | params/MAdds checked | widened | off | unpublished | errors | top-1 reproduced |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for paper, rows in results.items():
        tables = sorted({str(r["row"].get("table")) for r in rows})
        s = summary({paper: rows})
        unpub = sum(1 for r in rows if "counts" in r and not r.get("checks"))
        err = sum(1 for r in rows if "error" in r)
        lines.append(f"| {paper} | {', '.join(tables)} | {len(rows)} | {s['default'] + len(s['widened'])} | "
                     f"{len(s['widened'])} | {len(s['off'])} | {unpub} | {err} | 0 / {len(rows)} |")
    lines += ["", *closing_note(results)]
    for paper, rows in results.items():
        lines += ["", f"## {paper}", "",
                  "| experiment | label | params M (paper) | MAdds M (paper) | deploy params M | deploy MAdds M | status |",
                  "|---|---|---|---|---:|---:|---|"]
        for r in rows:
            row = r["row"]
            if "error" in r:
                lines.append(f"| {row['id']} | {row.get('label', '')} | - | - | - | - | error: {r['error']} |")
                continue
            c, checks = r["counts"], r["checks"]
            status = "; ".join([r["status"] or "unpublished", *r["notes"]])
            lines.append(f"| {row['id']} | {row.get('label', '')} | {_ours(checks, 'params_m', c['params'])} "
                         f"({row.get('params_m') or '-'}, {_delta_of(checks, 'params_m')}) | "
                         f"{_ours(checks, 'madds_m', c['madds'])} ({row.get('madds_m') or '-'}, "
                         f"{_delta_of(checks, 'madds_m')}) | {_m(c['deploy_params'])} | {_m(c['deploy_madds'])} | "
                         f"{status} |")
    return "\n".join(lines) + "\n"


def matrix_section(page: str, page_path: Path) -> str:
    """README's copy of the page's papers x rows matrix (the first table), with a pointer to the full page."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| paper |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    command = next(line for line in lines if line.startswith("Command: "))
    return "\n".join([*lines[start:end], "", f"{command.split(' (')[0]}; every row: `{page_path.as_posix()}`."])


def build_parser() -> argparse.ArgumentParser:
    from dyconv_repro.config import groups_help

    p = argparse.ArgumentParser(prog="dyconv-complexity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=groups_help("dyconv-complexity", "dyconv-complexity [overrides ...] [options]"))
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=mobilenet_v2 op=dynamicconv")
    p.add_argument("--paper", default=None, help="count every row of results/expected/<paper>.yaml ('all': every paper)")
    p.add_argument("--write", nargs="?", const="results/tables/paper_rows.md", default=None, metavar="PATH",
                   help="with --paper: also write the markdown page (default results/tables/paper_rows.md)")
    p.add_argument("--readme", action="store_true",
                   help="with --paper all --write: also refresh README's papers x rows matrix")
    p.add_argument("--layers", action="store_true", help="print the per-layer surgery table")
    p.add_argument("--image-size", type=int, default=None, help="input resolution (default: data.image_size)")
    p.add_argument("--decomposed", nargs="?", const="all", default=None, choices=("all", "auto"),
                   help="also count the decomposed structured form (all layers, or auto: where the SumPool pays on "
                        "CPU, as dyconv-deploy decompose=auto); the SumPool's additions are free")
    return p


@user_errors_exit
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.paper:
        selected = papers() if args.paper == "all" else [args.paper]
        results = {p: paper_rows(p, args.image_size, args.overrides) for p in selected}
        print("\n".join(closing_note(results)))
        if args.write:
            command = "dyconv-complexity " + " ".join(argv if argv is not None else sys.argv[1:])
            path = Path(args.write)
            path.parent.mkdir(parents=True, exist_ok=True)
            page = render_page(results, command)
            path.write_text(page)
            print(f"wrote {path}")
            if args.readme:
                from dyconv_repro.results.readme import update_section

                print(f"updated {update_section('paper_matrix', matrix_section(page, path))}")
        raise SystemExit(0)
    overrides = list(args.overrides) + ([f"data.image_size={args.image_size}"] if args.image_size else [])
    cfg = compose(overrides)
    r = measure(cfg, layers=args.layers, decomposed=args.decomposed)
    print(f"# {CONVENTION}")
    print(f"model={cfg.model.name} op={cfg.op.name} policy={cfg.policy.name} image_size={cfg.data.image_size}")
    print(f"params {_m(r['params'])}M  MAdds {_m(r['madds'])}M  |  deploy: params {_m(r['deploy_params'])}M  "
          f"MAdds {_m(r['deploy_madds'])}M")
    if args.decomposed:
        print(f"decomposed ({args.decomposed}): params {_m(r['decomposed_params'])}M  MAdds {_m(r['decomposed_madds'])}M")


if __name__ == "__main__":
    main()
