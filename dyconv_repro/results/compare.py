"""Paper vs ours: group runs by experiment id, aggregate seeds, join with the expected rows, render.

Status of a row (top-1 against the paper, mean over seeds of each run's best top-1):
  ok / low / high  - |ours - paper| <= tolerance.top1, or below / above it (a full-scale run);
  unpublished      - we ran it at full scale but the paper's top-1 was not found;
  smoke            - the runs trained on digits / fake data or for far fewer epochs than the recipe:
                     their top-1 says nothing about the paper (params / MAdds still do);
  missing          - no finished run; the reason (error.txt / summary error / still running) is listed.
Params / MAdds are checked separately ("complexity": ok / off / n/c = not comparable, e.g. measured at
another image size or number of classes than the paper's).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

from dyconv_repro.errors import UserError
from dyconv_repro.results.collect import RunRecord
from dyconv_repro.results.expected import check_counts, row_count

SMOKE_DATA = ("digits", "fake")
CONVENTION = ("MAdds = multiply-adds at batch 1 including routing/attention and kernel aggregation "
              "(FLOPs = 2 x MAdds; the papers' \"FLOPs\" are MAdds). Params and MAdds in millions. "
              "Ours: mean ± std over n seeds of each run's best top-1.")
CSV_FIELDS = ("id", "table", "label", "kind", "backbone", "op", "paper_params_m", "ours_params_m", "params_delta_pct",
              "paper_madds_m", "ours_madds_m", "madds_delta_pct", "paper_top1", "paper_top1_alt", "ours_top1_mean",
              "ours_top1_std", "n", "report", "delta_top1", "tolerance_top1", "status", "complexity", "data", "image_size",
              "epochs", "recipe_epochs", "hardware", "source", "conf", "reason")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pct(ours: float | None, paper: float | None) -> float | None:
    if ours is None or not paper:
        return None
    return 100.0 * (ours - paper) / paper


def _num_classes(run: RunRecord) -> int | None:
    n = run.get("model.num_classes") or run.get("data.num_classes")
    return int(n) if n is not None else None


def _runs_for(row: dict, runs: list[RunRecord]) -> list[RunRecord]:
    """The runs of this row; for a two-stage row only the compared stage (not its stage-1 run)."""
    mine = [r for r in runs if r.experiment == row["id"]]
    if row.get("stage"):
        mine = [r for r in mine if r.stage in (None, row["stage"])]
    return mine


REPORTS = ("final", "final_raw", "best")


def reported_top1(run: RunRecord, report: str = "final") -> float | None:
    """The top-1 a paper reports: `final` = the last evaluation of the model the recipe ends with (its EMA when
    the recipe keeps one, as the TF EfficientNet-family code evaluates), `final_raw` = the last evaluation of the
    raw weights, `best` = the maximum over evaluations and over raw / EMA (optimistic; only when asked)."""
    if report == "best":
        value = run.get("best_top1")
    elif report == "final_raw":
        value = run.get("final_top1")
    else:
        value = run.get("final_ema_top1")
        value = run.get("final_top1") if value is None else value
    return None if value is None else float(value)


def compare_row(row: dict, runs: list[RunRecord], smoke_epoch_frac: float = 0.5, report: str | None = None) -> dict:
    """One expected row joined with its runs; `report` (default: the row's `report`, else `final`) picks which
    top-1 of each run is compared (`reported_top1`)."""
    mine = _runs_for(row, runs)
    done = [r for r in mine if r.status == "finished"]
    tol = row.get("tolerance") or {}
    out = {k: row.get(k) for k in ("id", "table", "label", "kind", "backbone", "op", "source", "conf")}
    out.update(paper_params_m=row.get("params_m"), paper_madds_m=row.get("madds_m"), paper_top1=row.get("top1"),
               paper_top1_alt=row.get("top1_alt"), tolerance_top1=tol.get("top1"), recipe_epochs=row.get("epochs"),
               n=len(done), reason="")
    if not done:
        reasons = []
        for r in mine:
            if r.failed:
                reasons.append(f"failed: {r.error or 'no error message'}")
            elif r.status in ("running", "unknown"):
                reasons.append(f"{r.status} ({r.run_dir.name})")
        out.update(status="missing", complexity="n/c", reason="; ".join(dict.fromkeys(reasons)) or "no run")
        return out
    report = report or row.get("report") or "final"
    if report not in REPORTS:
        raise UserError(f"report {report!r} of row {row['id']} is not one of {', '.join(REPORTS)}")
    top1 = [v for v in (reported_top1(r, report) for r in done) if v is not None]
    mean, std = _mean_std(top1)
    out.update(ours_top1_mean=mean, ours_top1_std=std, n=len(done), report=report)
    data = sorted({str(r.get("data") or r.get("data.name") or "?") for r in done})
    sizes = sorted({int(r.get("image_size") or r.get("data.image_size") or 0) for r in done})
    epochs = [r.get("epochs") for r in done if r.get("epochs") is not None]
    out.update(data=",".join(data), image_size=",".join(map(str, sizes)),
               epochs=(min(epochs) if epochs else None),
               hardware="; ".join(sorted({str(r.get("hardware")) for r in done if r.get("hardware")})))
    # complexity: only comparable at the paper's input size and number of classes
    same_classes = all(_num_classes(r) in (None, row.get("num_classes")) for r in done)
    same_size = sizes == [int(row.get("image_size") or 0)]
    params = [r.get("params") / 1e6 for r in done if r.get("params") is not None]
    madds = [r.get("madds") / 1e6 for r in done if r.get("madds") is not None]
    out["ours_params_m"] = statistics.fmean(params) if params else None
    out["ours_madds_m"] = statistics.fmean(madds) if madds else None
    # the row's convention (results/expected.py): 2^20 units; a static-twin count is not in a run's record
    raw = {"params_m": out["ours_params_m"] if same_classes else None,
           "madds_m": out["ours_madds_m"] if same_classes and same_size and row_count(row) == "model" else None}
    checks = check_counts(row, {k: None if v is None else v * 1e6 for k, v in raw.items()})
    for c in checks:
        out[f"{c['field'][:-2]}_delta_pct"] = _pct(c["ours"], c["published"])
    out["complexity"] = ("ok" if all(c["ok"] for c in checks) else "off") if checks else "n/c"
    # status
    smoke = any(d in SMOKE_DATA for d in data) or (
        row.get("epochs") and (not epochs or min(epochs) < smoke_epoch_frac * float(row["epochs"])))
    if mean is not None and row.get("top1") is not None:
        out["delta_top1"] = mean - float(row["top1"])
    if smoke:  # a smoke run's top-1 says nothing about the paper: no delta
        out["status"] = "smoke"
        out["delta_top1"] = None
    elif mean is None:
        out["status"] = "missing"
        out["reason"] = "finished without a top-1"
    elif row.get("top1") is None:
        out["status"] = "unpublished"
    else:
        t = float(tol.get("top1", 0.5))
        out["status"] = "ok" if abs(out["delta_top1"]) <= t else ("low" if out["delta_top1"] < 0 else "high")
    return out


def compare(doc: dict, runs: list[RunRecord], smoke_epoch_frac: float = 0.5, report: str | None = None) -> list[dict]:
    """Every expected row of `doc` (an expected file) joined with the runs, in file order. The top-1 compared is
    `report` if given, else the row's or the paper's `report:` field, else `final`."""
    return [compare_row(row, runs, smoke_epoch_frac, report or row.get("report") or doc.get("report"))
            for row in doc["rows"]]


# ------------------------------------------------------------------------------------------------ rendering
def _f(x, nd=1, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:+.{nd}f}" if signed else f"{x:.{nd}f}"


def _pair(paper, ours, nd) -> str:
    return f"{_f(paper, nd)} / {_f(ours, nd)}"


def render_markdown(doc: dict, results: list[dict]) -> str:
    """One markdown table per paper table, with the convention stated in the header."""
    reports = sorted({r.get("report") for r in results if r.get("report")})
    lines = [f"# {doc.get('title', doc.get('paper'))}: paper vs ours", "", CONVENTION, "",
             "Top-1 ours: " + (", ".join(reports) or "final") + " (final = the last evaluation of the model the "
             "recipe ends with, its EMA when the recipe keeps one; best = the maximum over evaluations, optimistic)", ""]
    counts = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    lines.append("Rows: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(results)})")
    lines.append("")
    titles = {row["table"]: row.get("table_title", row["table"]) for row in doc["rows"]}
    for table in dict.fromkeys(r["table"] for r in results):
        lines += [f"## {table}: {titles[table]}", "",
                  "| Row | Params paper / ours | MAdds paper / ours | Top-1 paper | Top-1 ours | Δ top-1 | Status | "
                  "Complexity | Data | Epochs | Hardware |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (x for x in results if x["table"] == table):
            paper = _f(r["paper_top1"], 2)
            if r.get("paper_top1_alt") is not None:
                paper += f" ({_f(r['paper_top1_alt'], 2)} v1)"
            ours = "—" if r.get("ours_top1_mean") is None else \
                f"{r['ours_top1_mean']:.2f} ± {r['ours_top1_std']:.2f} (n={r['n']})"
            epochs = "—" if r.get("epochs") is None else f"{r['epochs']}/{r.get('recipe_epochs')}"
            status = r["status"] + (f": {r['reason']}" if r.get("reason") else "")
            lines.append(f"| {r['label']} (`{r['id']}`) | {_pair(r['paper_params_m'], r.get('ours_params_m'), 2)} | "
                         f"{_pair(r['paper_madds_m'], r.get('ours_madds_m'), 1)} | {paper} | {ours} | "
                         f"{_f(r.get('delta_top1'), 2, signed=True)} | {status} | {r.get('complexity', 'n/c')} | "
                         f"{r.get('data') or '—'} | {epochs} | {r.get('hardware') or '—'} |")
        lines.append("")
    return "\n".join(lines)


def render_csv(results: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def write_tables(doc: dict, results: list[dict], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, cs = out / f"{doc['paper']}.md", out / f"{doc['paper']}.csv"
    md.write_text(render_markdown(doc, results) + "\n")
    cs.write_text(render_csv(results))
    return md, cs


# ---------------------------------------------------------------------------------------------------- sweeps
_IGNORED = ("seed", "run_id", "run_name", "output_dir", "experiment_id", "stage", "pipeline", "trainer.progress")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def sweep_summary(runs: list[RunRecord], metric: str = "best_top1") -> tuple[list[dict], str]:
    """Group finished runs by the config values that differ between them (the swept ones).

    Returns rows sorted best-first (mean/std/n of `metric` over seeds) and a `best: ...` line.
    """
    done = [r for r in runs if r.status == "finished" and r.get(metric) is not None]
    if not done:
        return [], "best: no finished run"
    flat = [_flatten(r.config) for r in done]
    keys = sorted({k for f in flat for k in f})
    varying = [k for k in keys if not any(k == i or k.startswith(i + ".") for i in _IGNORED)
               and len({repr(f.get(k)) for f in flat}) > 1]
    groups: dict[tuple, list[float]] = {}
    for r, f in zip(done, flat):
        groups.setdefault(tuple((k, f.get(k)) for k in varying), []).append(float(r.get(metric)))
    rows = []
    for combo, vals in groups.items():
        mean, std = _mean_std(vals)
        rows.append({"params": " ".join(f"{k}={v}" for k, v in combo) or "(no varying key)", "mean": mean,
                     "std": std, "n": len(vals)})
    rows.sort(key=lambda x: -x["mean"])
    b = rows[0]
    return rows, f"best: {b['params']} -> {metric} {b['mean']:.2f} ± {b['std']:.2f} (n={b['n']})"
