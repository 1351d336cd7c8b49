"""`dyconv-compare`: paper vs ours for one paper's tables, or the best point of a sweep.

    dyconv-compare --paper weightnet                       # runs/ -> results/tables/weightnet.{md,csv}
    dyconv-compare --paper weightnet --runs /scratch/runs --out results/tables --plot
    dyconv-compare --sweep runs/multirun/2025-01-01_12-00-00   # hyper-parameter sweep: table + `best:` line

Rows are grouped by experiment id (the summary's `experiment`), aggregated over seeds (mean ± std, n),
joined with results/expected/<paper>.yaml and given a status (ok / low / high / unpublished / smoke /
missing with the failure reason); see dyconv_repro.results.compare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dyconv_repro.errors import UserError
from dyconv_repro.results.collect import collect_runs
from dyconv_repro.results.compare import compare, sweep_summary, write_tables
from dyconv_repro.results.expected import PAPERS, load_expected


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyconv-compare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper", choices=PAPERS, help="paper whose tables to compare")
    p.add_argument("--runs", default="runs", help="folder searched (recursively) for run summaries [runs]")
    p.add_argument("--out", default="results/tables", help="where <paper>.md / .csv / .png go [results/tables]")
    p.add_argument("--expected", default=None, help="expected-results file (default results/expected/<paper>.yaml)")
    p.add_argument("--plot", action="store_true", help="also write <out>/<paper>.png (top-1 vs MAdds)")
    p.add_argument("--smoke-epoch-frac", type=float, default=0.5,
                   help="runs with fewer epochs than this fraction of the recipe's are 'smoke' [0.5]")
    p.add_argument("--sweep", default=None, metavar="DIR",
                   help="summarize a hyper-parameter sweep under DIR instead (ranked table + `best:` line)")
    p.add_argument("--metric", default="best_top1", help="summary field a sweep is ranked by [best_top1]")
    p.add_argument("--report", default=None, choices=("final", "final_raw", "best"),
                   help="which top-1 of each run is compared: final (the paper's convention, its EMA when the recipe "
                        "keeps one), final_raw, or best (max over epochs and raw/EMA, optimistic) [the row's or paper's "
                        "`report:` field, else final]")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.sweep:
            runs = collect_runs(args.sweep)
            rows, best = sweep_summary(runs, args.metric)
            if not rows:
                seen = ", ".join(sorted({r.status for r in runs})) or "none"
                raise UserError(f"no finished run under {args.sweep} (runs found: {len(runs)}, status: {seen}); give "
                                "the sweep's own folder, runs/multirun/<date_time>, whose job folders link to their runs")
            for r in rows:
                print(f"{r['mean']:7.2f} ± {r['std']:.2f} (n={r['n']})  {r['params']}")
            print(best)
            return 0
        if not args.paper:
            raise UserError("give --paper (one of: " + ", ".join(PAPERS) + ") or --sweep DIR")
        doc = load_expected(args.paper, args.expected)
        if not Path(args.runs).is_dir():
            print(f"note: runs folder {args.runs} does not exist; every row is missing", file=sys.stderr)
        results = compare(doc, collect_runs(args.runs), args.smoke_epoch_frac, args.report)
        md, cs = write_tables(doc, results, args.out)
        if not args.quiet:
            print(md.read_text())
        print(f"wrote {md} and {cs}", file=sys.stderr)
        if args.plot:
            from dyconv_repro.results.plot import plot_top1_vs_madds

            png = plot_top1_vs_madds(doc, results, Path(args.out) / f"{doc['paper']}.png")
            print(f"wrote {png}", file=sys.stderr)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
