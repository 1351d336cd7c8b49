"""The shipped sweeps (configs/sweep/) end to end: `dyconv-train -m +sweep=<name>` then
`dyconv-compare --sweep <its multirun dir>` ranks exactly that sweep's runs (each job folder links to its
run directory; an unrelated run in the same runs folder stays out)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import yaml

from dyconv_repro.config_dir import config_dir

from .conftest import run_cli

TINY = ["trainer.epochs=1", "trainer.max_steps_per_epoch=2", "recipe.batch_size=32", "trainer.progress=false"]

# sweep -> the overrides its header comment gives for the offline digits data (slow: the dynamic ops)
SWEEPS = {
    "lr_wd_grid": ([], False),
    "temperature": (["op=dynamicconv", "op.kwargs.num_kernels=2"], True),
    "structured_lam": (["op=structured"], True),
}
NOT_RUN = {"optuna_lr_wd": "an optional plugin, not a dependency"}


def test_every_shipped_sweep_is_tested():
    shipped = {p.stem for p in (Path(config_dir()) / "sweep").glob("*.yaml")}
    assert shipped == set(SWEEPS) | set(NOT_RUN)


def _grid(name: str) -> list[dict]:
    params = yaml.safe_load((Path(config_dir()) / "sweep" / f"{name}.yaml").read_text())["hydra"]["sweeper"]["params"]
    keys = list(params)
    values = [[_number(v) for v in str(params[k]).split(",")] for k in keys]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _number(text: str):
    """A sweep value as Hydra parses it (1e-5 is a float; YAML 1.1 would read a string)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _sweep_then_compare(tmp_path, name, extra):
    runs = tmp_path / "runs"
    run_cli(["dyconv-train", *extra, *TINY, f"output_dir={runs}"], cwd=tmp_path, check=True)  # not in the sweep
    run_cli(["dyconv-train", "-m", f"+sweep={name}", *extra, *TINY, f"output_dir={runs}"], cwd=tmp_path,
            check=True, timeout=900)
    (sweep_dir,) = (runs / "multirun").iterdir()
    proc = run_cli(["dyconv-compare", "--sweep", str(sweep_dir)], cwd=tmp_path, check=True)
    return sweep_dir, proc.stdout.strip().splitlines()


def _check(tmp_path, name):
    extra, _ = SWEEPS[name]
    sweep_dir, lines = _sweep_then_compare(tmp_path, name, extra)
    grid = _grid(name)
    jobs = sorted(sweep_dir.glob("*/run"))
    assert len(jobs) == len(grid), list(sweep_dir.iterdir())
    summaries = [json.loads((j / "summary.json").read_text()) for j in jobs]
    assert all(s["status"] == "finished" for s in summaries)
    *rows, best = lines
    assert len(rows) == len(grid), lines  # one row per grid point, the unrelated run left out
    assert all("(n=1)" in r for r in rows), rows
    def names(r, k, v):  # k=v as a whole token (1 must not match 10.0; a float key prints 1 as 1.0)
        return re.search(rf"(^|\s){re.escape(k)}=({re.escape(str(v))}|{re.escape(str(float(v)))})(\s|$)", r) \
            if isinstance(v, (int, float)) else f"{k}={v}" in r

    for point in grid:  # every grid point is a row, named by its swept values
        assert sum(all(names(r, k, v) for k, v in point.items()) for r in rows) == 1, (point, rows)
    top = max(s["best_top1"] for s in summaries)
    assert best.startswith("best: ") and f"best_top1 {top:.2f}" in best, (best, top)


def test_lr_wd_grid_sweep_and_compare(tmp_path):
    _check(tmp_path, "lr_wd_grid")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["temperature", "structured_lam"])
def test_mechanics_sweeps_apply_every_grid_value(tmp_path, name):
    _check(tmp_path, name)
    trained = []
    for job in sorted((tmp_path / "runs" / "multirun").glob("*/*/run")):  # what each run's config.yaml recorded
        saved = yaml.safe_load((job / "config.yaml").read_text())
        point = {}
        for key in _grid(name)[0]:
            node = saved
            for part in key.split("."):
                node = node[part]
            point[key] = node
        trained.append(point)
    as_set = lambda points: sorted(tuple(sorted((k, float(v)) for k, v in p.items())) for p in points)  # noqa: E731
    assert as_set(trained) == as_set(_grid(name))  # every grid value was trained, none lost to an override


def test_compare_sweep_of_a_folder_without_runs_is_an_error(tmp_path):
    proc = run_cli(["dyconv-compare", "--sweep", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no finished run"), proc.stderr
