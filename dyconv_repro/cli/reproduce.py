"""`dyconv-reproduce`: launch a paper's table(s) as a LIST of rows x seeds (never a cartesian product).

    dyconv-reproduce weightnet --dry-run                 # print the commands
    dyconv-reproduce weightnet --smoke                   # every row, a few steps each, on fake data
    dyconv-reproduce weightnet --table t1 --seeds 3      # one table, 3 seeds, locally, one run after another
    dyconv-reproduce dynamicconv --seeds 3 --launcher submitit_slurm -- hydra.launcher.partition=gpu
    dyconv-compare --paper weightnet                     # then: paper vs ours

Rows come from results/expected/<paper>.yaml (one per configs/experiment/<paper>/<row>.yaml); `--table`
and `--rows` (glob on the row name) select some. Launchers:
  local           one `dyconv-train experiment=<row> seed=<s>` subprocess per row and seed. A failed run
                  does not stop the others; when it left no run directory of its own, a stub
                  <runs>/_failed/<paper>/<row>/seed<s>-<time>/ (summary.json status failed + error.txt)
                  records it, so `dyconv-compare` lists the row as missing with the reason.
  submitit_slurm  one `dyconv-train -m hydra/launcher=submitit_slurm experiment=<a>,<b>,... seed=0,1,2`
                  per wave: Slurm array jobs, one per row x seed (configs/hydra/launcher/submitit_slurm.yaml;
                  pass partition etc. after `--`).
Two-stage rows (RefConv refocus: `stage1` in the expected file) run in a second wave: each gets
model.init_from=<best.pt of its stage-1 row, same seed> when that run exists under --runs, otherwise its
experiment's `pipeline` trains stage 1 itself.
--smoke proves the whole table runs end to end in seconds per row: each row keeps its own model, operator
and recipe mechanics, but trains 1 epoch x 2 steps of batch 8 on `fake` data at the paper's image size
and number of classes (so params / MAdds stay comparable with the paper), or with `--smoke-data digits`
on the offline digits images at 32 px (CIFAR stem; params/MAdds then not comparable). dyconv-compare
labels such rows "smoke". Arguments after `--` are passed to every dyconv-train call.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path

from dyconv_repro.errors import UserError
from dyconv_repro.results.collect import collect_runs
from dyconv_repro.results.expected import PAPERS, load_expected

LAUNCHERS = ("local", "submitit_slurm")


def _default_train_cmd() -> str:
    if shutil.which("dyconv-train"):
        return "dyconv-train"
    return f"{shlex.quote(sys.executable)} -m dyconv_repro.cli.train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dyconv-reproduce", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("paper", choices=PAPERS)
    p.add_argument("--table", action="append", default=None, help="table key(s) to run (e.g. t1); repeatable")
    p.add_argument("--rows", default=None, help="glob on the row name, e.g. 't1_w1.0_*'")
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row [1]")
    p.add_argument("--launcher", choices=LAUNCHERS, default="local")
    p.add_argument("--smoke", action="store_true", help="1 epoch x 2 steps per row on tiny data")
    p.add_argument("--smoke-data", choices=("fake", "digits"), default="fake")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--runs", default="runs", help="output_dir of every run [runs]")
    p.add_argument("--expected", default=None, help="expected-results file (default results/expected/<paper>.yaml)")
    p.add_argument("--train-cmd", default=_default_train_cmd(),
                   help="the training command [dyconv-train, else python -m dyconv_repro.cli.train]")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Options, then `--` and Hydra overrides passed to every dyconv-train call."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    return args


def select_rows(doc: dict, tables: list[str] | None, pattern: str | None) -> list[dict]:
    rows = doc["rows"]
    if tables:
        known = list(dict.fromkeys(r["table"] for r in rows))
        want = [t for arg in tables for t in arg.split(",") if t]
        bad = [t for t in want if t not in known]
        if bad:
            raise UserError(f"unknown table(s) {bad} for {doc['paper']}; valid tables: {', '.join(known)}")
        rows = [r for r in rows if r["table"] in want]
    if pattern:
        rows = [r for r in rows if fnmatch.fnmatch(r["id"].split("/", 1)[1], pattern)]
    if not rows:
        raise UserError(f"no row of {doc['paper']} matches --table {tables} --rows {pattern!r}")
    return rows


def smoke_overrides(row: dict, data: str = "fake") -> list[str]:
    """Tiny, fast training that keeps the row's model, operator and recipe mechanics."""
    common = ["trainer.epochs=1", "recipe.epochs=1", "trainer.max_steps_per_epoch=2", "recipe.batch_size=8",
              "recipe.warmup_epochs=0", "trainer.progress=false"]
    if data == "digits":
        return ["data=digits", *common]
    return ["data=fake", f"data.image_size={row.get('image_size', 224)}", f"data.num_classes={row.get('num_classes', 1000)}",
            "data.train_size=16", "data.val_size=8", *common]


def stage1_checkpoint(runs_dir: str | Path, experiment: str, seed: int) -> Path | None:
    """best.pt (else last.pt) of the newest finished run of `experiment` with this seed."""
    found = [r for r in collect_runs(runs_dir) if r.experiment == experiment and r.seed == seed
             and r.status == "finished" and r.stage in (None, "baseline", "refocus")]
    for run in sorted(found, key=lambda r: r.run_dir.stat().st_mtime, reverse=True):
        for name in ("best.pt", "last.pt"):
            for path in (run.run_dir / "checkpoints" / name, run.run_dir / name):
                if path.is_file():
                    return path
    return None


def _waves(rows: list[dict]) -> list[list[dict]]:
    first = [r for r in rows if not r.get("stage1")]
    second = [r for r in rows if r.get("stage1")]
    return [w for w in (first, second) if w]


def plan(args, rows: list[dict]) -> list[tuple[dict | None, int | None, list[str]]]:
    """(row, seed, argv) per command; row/seed None for a multirun over several."""
    extra = list(args.extra or [])
    base = [*shlex.split(args.train_cmd)]
    out_dir = f"output_dir={args.runs}"
    seeds = list(range(args.seeds))
    cmds = []
    for wave in _waves(rows):
        if args.launcher == "local":
            for row in wave:
                for s in seeds:
                    argv = [*base, f"experiment={row['id']}", f"seed={s}", out_dir]
                    if row.get("stage1"):
                        ckpt = stage1_checkpoint(args.runs, row["stage1"], s)
                        if ckpt is not None:
                            argv.append(f"model.init_from={ckpt}")
                    if args.smoke:
                        argv += smoke_overrides(row, args.smoke_data)
                    cmds.append((row, s, argv + extra))
            continue
        # slurm: one multirun per wave and smoke shape (rows of one multirun share the data overrides)
        groups: dict[tuple, list[dict]] = {}
        for row in wave:
            key = tuple(smoke_overrides(row, args.smoke_data)) if args.smoke else ()
            ckpts = {s: stage1_checkpoint(args.runs, row["stage1"], s) for s in seeds} if row.get("stage1") else {}
            if ckpts and all(ckpts.values()):  # stage 1 exists: one job per seed, each from its own checkpoint
                for s in seeds:
                    cmds.append((None, None, [*base, "-m", "hydra/launcher=submitit_slurm", f"experiment={row['id']}",
                                              f"seed={s}", out_dir, f"model.init_from={ckpts[s]}", *key, *extra]))
                continue
            groups.setdefault(key, []).append(row)
        for key, group in groups.items():
            argv = [*base, "-m", "hydra/launcher=submitit_slurm", "experiment=" + ",".join(r["id"] for r in group),
                    "seed=" + ",".join(map(str, seeds)), out_dir, *key, *extra]
            cmds.append((None, None, argv))
    return cmds


_EXC = re.compile(r"^(error:|[\w.]*(Error|Exception|Interrupt)\b)")


def failure_reason(output: str) -> str:
    """The line of a failed run's output that says why: the last exception / `error:` line, else the last line."""
    lines = [ln.strip() for ln in output.strip().splitlines()
             if ln.strip() and not ln.startswith("Set the environment variable HYDRA_FULL_ERROR")]
    for ln in reversed(lines):
        if _EXC.match(ln):
            return ln
    return lines[-1] if lines else "no output"


def _record_failure(runs: str | Path, row: dict, seed: int, rc: int, tail: str) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    d = Path(runs) / "_failed" / row["id"] / f"seed{seed}-{stamp}"
    d.mkdir(parents=True, exist_ok=True)
    msg = f"exit code {rc}: {failure_reason(tail)}"
    (d / "error.txt").write_text(tail[-4000:] + f"\n{msg}\n")
    (d / "summary.json").write_text(json.dumps({"experiment": row["id"], "status": "failed", "seed": seed,
                                                "error": msg, "source": "dyconv-reproduce"}, indent=2))
    return d


def _run_streaming(argv: list[str]) -> tuple[int, str]:
    """Run, passing output through, and keep the tail of stderr for the failure record."""
    tail: deque[str] = deque(maxlen=200)
    try:
        proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1)
    except OSError as e:
        return 127, f"cannot start {argv[0]}: {e}"
    assert proc.stderr is not None
    for line in proc.stderr:
        sys.stderr.write(line)
        tail.append(line)
    return proc.wait(), "".join(tail)


def check_data(rows: list[dict], args) -> None:
    """Build each distinct dataset the local runs would train on once, before launching anything: missing
    data is one UserError here instead of the same failure once per row and seed."""
    from dyconv_repro.config import compose
    from dyconv_repro.data import build_dataset

    seen = set()
    for row in rows:
        over = [f"experiment={row['id']}", *(smoke_overrides(row, args.smoke_data) if args.smoke else []),
                *[o for o in args.extra if "=" in o and not o.startswith(("hydra", "-"))]]
        try:
            cfg = compose(over)
        except UserError:  # a row that does not compose fails in its own run, as before
            continue
        key = repr(sorted((k, str(v)) for k, v in cfg.data.items()))
        if key not in seen:
            seen.add(key)
            build_dataset(cfg.data, "train", cfg.recipe)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.seeds < 1:
            raise UserError(f"--seeds must be >= 1, got {args.seeds}")
        doc = load_expected(args.paper, args.expected)
        rows = select_rows(doc, args.table, args.rows)
        # the second wave's init_from depends on the first wave's results: plan it after the first has run
        waves = _waves(rows)
        if args.launcher == "local" and not args.dry_run:
            check_data(rows, args)
        failures, total = [], 0
        for i, wave in enumerate(waves):
            cmds = plan(args, wave)
            if args.dry_run:
                print(f"# wave {i + 1}: {len(wave)} row(s) x {args.seeds} seed(s)"
                      + (" (two-stage rows: stage 1 from --runs when it exists, else the pipeline trains it)" if i else ""))
                for _, _, c in cmds:
                    print(shlex.join(c))
                continue
            for row, seed, c in cmds:
                total += 1
                print(f"[dyconv-reproduce] {shlex.join(c)}", file=sys.stderr, flush=True)
                rc, tail = _run_streaming(c)
                if rc != 0:
                    failures.append(c)
                    if row is not None:
                        where = _record_failure(args.runs, row, seed, rc, tail)
                        print(f"[dyconv-reproduce] FAILED (exit {rc}); recorded in {where}", file=sys.stderr)
        if not args.dry_run:
            print(f"[dyconv-reproduce] {total - len(failures)}/{total} command(s) succeeded; "
                  f"compare with: dyconv-compare --paper {args.paper} --runs {args.runs}", file=sys.stderr)
        return 1 if failures else 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
