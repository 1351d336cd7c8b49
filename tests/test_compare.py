"""dyconv-compare and dyconv-reproduce on synthetic run directories (no training)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from dyconv_repro.cli import compare as compare_cli
from dyconv_repro.cli import reproduce
from dyconv_repro.results.collect import collect_runs
from dyconv_repro.results.compare import compare, render_markdown, sweep_summary
from dyconv_repro.results.expected import load_expected

DOC = {
    "paper": "toy", "title": "Toy paper",
    "rows": [
        {"id": "toy/t1_base", "table": "t1", "table_title": "Table 1", "label": "base", "kind": "baseline",
         "backbone": "resnet18", "op": "conv", "data": "imagenet", "image_size": 224, "num_classes": 1000,
         "recipe": "r", "epochs": 100, "params_m": 11.7, "madds_m": 1820.0, "top1": 70.0, "source": "S1",
         "conf": "official", "provenance": "published", "tolerance": {"params_pct": 2, "madds_pct": 3, "top1": 0.5}},
        {"id": "toy/t1_dy", "table": "t1", "table_title": "Table 1", "label": "dy", "kind": "main",
         "backbone": "resnet18", "op": "dynamicconv", "data": "imagenet", "image_size": 224, "num_classes": 1000,
         "recipe": "r", "epochs": 100, "params_m": 40.0, "madds_m": 1850.0, "top1": 72.0, "source": "S1",
         "conf": "official", "provenance": "published", "tolerance": {"params_pct": 2, "madds_pct": 3, "top1": 0.5}},
        {"id": "toy/t1_gone", "table": "t1", "table_title": "Table 1", "label": "gone", "kind": "main",
         "backbone": "resnet18", "op": "condconv", "data": "imagenet", "image_size": 224, "num_classes": 1000,
         "recipe": "r", "epochs": 100, "params_m": None, "madds_m": None, "top1": 71.0, "source": "S1",
         "conf": "official", "provenance": "published", "tolerance": {"params_pct": 2, "madds_pct": 3, "top1": 0.5}},
        {"id": "toy/t2_smoke", "table": "t2", "table_title": "Table 2", "label": "smoke", "kind": "main",
         "backbone": "resnet18", "op": "weightnet", "data": "imagenet", "image_size": 224, "num_classes": 1000,
         "recipe": "r", "epochs": 100, "params_m": 5.0, "madds_m": 100.0, "top1": 60.0, "source": "S1",
         "conf": "official", "provenance": "published", "tolerance": {"params_pct": 2, "madds_pct": 3, "top1": 0.5}},
        {"id": "toy/t2_refocus", "table": "t2", "table_title": "Table 2", "label": "refocus", "kind": "main",
         "backbone": "resnet18", "op": "refconv", "data": "imagenet", "image_size": 224, "num_classes": 1000,
         "recipe": "r", "epochs": 100, "params_m": None, "madds_m": None, "top1": None, "source": "S1",
         "conf": "not_found", "provenance": "project-defined", "tolerance": {"params_pct": 2, "madds_pct": 3, "top1": 0.5},
         "stage1": "toy/t1_base", "stage": "refocus"},
    ],
}


def write_run(root: Path, name: str, status="finished", config=None, error=None, **summary) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if status is not None:
        (d / "summary.json").write_text(json.dumps({"status": status, **summary}))
    (d / "config.yaml").write_text(yaml.safe_dump(config or {"data": {"name": summary.get("data", "imagenet"),
                                                                       "num_classes": 1000}}))
    if error:
        (d / "error.txt").write_text(f"Traceback (most recent call last):\n  ...\n{error}\n")
    return d


def full(exp, seed, top1, params=11.7e6, madds=1820e6, **kw):
    """A finished full-scale run whose final top-1 is `top1` (its best epoch was 0.5 higher)."""
    return dict(experiment=exp, seed=seed, final_top1=top1, best_top1=None if top1 is None else top1 + 0.5,
                params=params, madds=madds,
                data="imagenet", image_size=224, epochs=100, hardware="H100 x8", **kw)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    write_run(root, "base/a", **full("toy/t1_base", 0, 69.8))
    write_run(root, "base/b", **full("toy/t1_base", 1, 70.2))
    write_run(root, "base/c", **full("toy/t1_base", 2, 70.6))
    write_run(root, "dy/a", **full("toy/t1_dy", 0, 70.0, params=45e6, madds=1860e6))
    write_run(root, "dy/b", status="failed", error="RuntimeError: CUDA out of memory", **full("toy/t1_dy", 1, None))
    write_run(root, "gone/a", status="failed", error="UserError: unknown op 'condconv'", experiment="toy/t1_gone", seed=0)
    write_run(root, "gone/b", status=None, error="KeyError: 'x'")  # died before a summary: reported, not matched
    write_run(root, "smoke/a", **{**full("toy/t2_smoke", 0, 9.0, params=5.05e6, madds=101e6), "data": "fake",
                                  "epochs": 1})
    # a two-stage row: the stage-1 run carries the same experiment id but must not be compared
    write_run(root, "ref/baseline", config={"stage": "baseline"}, **full("toy/t2_refocus", 0, 10.0))
    write_run(root, "ref/refocus", config={"stage": "refocus"}, **full("toy/t2_refocus", 0, 71.5))
    return root


def by_id(results):
    return {r["id"]: r for r in results}


def test_collect_reads_summaries_and_orphan_errors(runs):
    recs = collect_runs(runs)
    assert len(recs) == 10
    orphan = [r for r in recs if r.run_dir.name == "b" and r.run_dir.parent.name == "gone"][0]
    assert orphan.failed and orphan.error == "KeyError: 'x'" and orphan.experiment is None


def test_mean_std_n_and_status(runs):
    res = by_id(compare(DOC, collect_runs(runs)))
    base = res["toy/t1_base"]
    assert base["n"] == 3 and base["ours_top1_mean"] == pytest.approx(70.2)
    assert base["ours_top1_std"] == pytest.approx(0.4)
    assert base["status"] == "ok" and base["delta_top1"] == pytest.approx(0.2)
    assert base["complexity"] == "ok" and base["params_delta_pct"] == pytest.approx(0.0)
    dy = res["toy/t1_dy"]  # one finished seed, one failed: the failed one is left out of the mean
    assert dy["n"] == 1 and dy["status"] == "low" and dy["delta_top1"] == pytest.approx(-2.0)
    assert dy["complexity"] == "off"  # 45M vs 40M params
    assert res["toy/t2_refocus"]["n"] == 1 and res["toy/t2_refocus"]["ours_top1_mean"] == pytest.approx(71.5)
    assert res["toy/t2_refocus"]["status"] == "unpublished"


def test_high_status(tmp_path):
    write_run(tmp_path, "x", **full("toy/t1_base", 0, 71.0))
    assert by_id(compare(DOC, collect_runs(tmp_path)))["toy/t1_base"]["status"] == "high"


def test_missing_lists_the_failure_reason(runs):
    res = by_id(compare(DOC, collect_runs(runs)))
    gone = res["toy/t1_gone"]
    assert gone["status"] == "missing" and "unknown op 'condconv'" in gone["reason"]
    empty = by_id(compare(DOC, []))
    assert all(r["status"] == "missing" and r["reason"] == "no run" for r in empty.values())


def test_smoke_runs_are_labelled_but_complexity_is_checked(runs):
    s = by_id(compare(DOC, collect_runs(runs)))["toy/t2_smoke"]
    assert s["status"] == "smoke" and s["complexity"] == "ok" and s["data"] == "fake"
    # a full-data run with far fewer epochs than the recipe is smoke too
    root = runs.parent / "short"
    write_run(root, "a", **{**full("toy/t1_base", 0, 50.0), "epochs": 10})
    assert by_id(compare(DOC, collect_runs(root)))["toy/t1_base"]["status"] == "smoke"


def test_complexity_not_comparable_at_another_resolution(tmp_path):
    write_run(tmp_path, "a", config={"data": {"name": "fake"}, "model": {"num_classes": 10}},
              **{**full("toy/t1_base", 0, 9.0, params=11.2e6, madds=40e6), "data": "fake", "image_size": 32})
    r = by_id(compare(DOC, collect_runs(tmp_path)))["toy/t1_base"]
    assert r["complexity"] == "n/c" and r.get("params_delta_pct") is None


def test_markdown_and_cli(runs, tmp_path, capsys):
    md = render_markdown(DOC, compare(DOC, collect_runs(runs)))
    assert "FLOPs = 2 x MAdds" in md and "## t1: Table 1" in md and "70.20 ± 0.40 (n=3)" in md
    exp_file = tmp_path / "toy.yaml"
    exp_file.write_text(yaml.safe_dump(DOC))
    out = tmp_path / "tables"
    rc = compare_cli.main(["--paper", "weightnet", "--expected", str(exp_file), "--runs", str(runs),
                           "--out", str(out), "--plot", "--quiet"])
    assert rc == 0
    assert (out / "toy.md").is_file() and (out / "toy.png").stat().st_size > 1000
    csv_lines = (out / "toy.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(DOC["rows"]) and csv_lines[0].startswith("id,table,label")


def test_sweep_summary_reports_the_best(tmp_path):
    for i, (lr, seed, top1) in enumerate([(0.1, 0, 70.0), (0.1, 1, 72.0), (0.2, 0, 73.0), (0.2, 1, 73.5)]):
        write_run(tmp_path, f"r{i}", config={"seed": seed, "run_id": f"id{i}", "recipe": {"lr": lr, "epochs": 5}},
                  experiment="x", seed=seed, best_top1=top1)
    rows, best = sweep_summary(collect_runs(tmp_path))
    assert [r["params"] for r in rows] == ["recipe.lr=0.2", "recipe.lr=0.1"]
    assert rows[0]["n"] == 2 and best.startswith("best: recipe.lr=0.2 -> best_top1 73.25")


# ------------------------------------------------------------------------------------------- reproduce
def dry(capsys, *argv):
    assert reproduce.main(["--dry-run", *argv]) == 0
    return [ln for ln in capsys.readouterr().out.splitlines() if ln and not ln.startswith("#")]


def test_reproduce_expands_rows_times_seeds_not_a_product(capsys, tmp_path):
    doc = load_expected("weightnet")
    t1 = [r["id"] for r in doc["rows"] if r["table"] == "t1"]
    cmds = dry(capsys, "weightnet", "--table", "t1", "--seeds", "3", "--runs", str(tmp_path))
    assert len(cmds) == len(t1) * 3
    got = sorted(a for c in cmds for a in shlex.split(c) if a.startswith("experiment="))
    assert got == sorted(f"experiment={i}" for i in t1 for _ in range(3))
    assert all(f"output_dir={tmp_path}" in c for c in cmds)
    slurm = dry(capsys, "weightnet", "--table", "t1", "--seeds", "3", "--launcher", "submitit_slurm",
                "--runs", str(tmp_path), "--", "hydra.launcher.partition=gpu")
    assert len(slurm) == 1
    argv = shlex.split(slurm[0])
    assert "-m" in argv and "hydra/launcher=submitit_slurm" in argv and "seed=0,1,2" in argv
    assert f"experiment={','.join(t1)}" in argv and argv[-1] == "hydra.launcher.partition=gpu"


def test_reproduce_smoke_keeps_paper_resolution(capsys):
    cmds = dry(capsys, "structured", "--smoke", "--rows", "t*_resnet5*_base")
    sizes = {c.split("experiment=")[1].split()[0]: c for c in cmds}
    assert "data.image_size=224" in sizes["structured/t1_resnet50_base"]
    assert "data.image_size=32" in sizes["structured/t2_resnet56_base"]
    assert all("trainer.max_steps_per_epoch=2" in c and "data=fake" in c for c in cmds)


def test_reproduce_second_wave_uses_the_stage1_checkpoint(capsys, tmp_path):
    run = write_run(tmp_path, "refconv/t1_mbv2_base/x", **full("refconv/t1_mbv2_base", 0, 60.0))
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "best.pt").write_bytes(b"")
    cmds = dry(capsys, "refconv", "--rows", "t1_mbv2_*", "--seeds", "2", "--runs", str(tmp_path))
    assert len(cmds) == 4 and "experiment=refconv/t1_mbv2_base" in cmds[0]  # stage 1 first
    refocus = [c for c in cmds if "t1_mbv2_refocus" in c]
    assert f"model.init_from={run / 'checkpoints' / 'best.pt'}" in refocus[0]  # seed 0 has a checkpoint
    assert "model.init_from" not in refocus[1]  # seed 1 does not: the experiment's pipeline trains stage 1


def test_reproduce_failed_row_does_not_stop_the_others(tmp_path, capsys):
    fail = f"{sys.executable} -c \"import sys; print('boom', file=sys.stderr); sys.exit(3)\""
    # on the offline digits data, so that reproduce's data check (run once before launching) passes
    rc = reproduce.main(["weightnet", "--rows", "t1_w0.5_*", "--runs", str(tmp_path), "--smoke", "--smoke-data", "digits",
                         "--train-cmd", fail])
    assert rc == 1
    recs = collect_runs(tmp_path)
    assert sorted(r.experiment for r in recs) == ["weightnet/t1_w0.5_base", "weightnet/t1_w0.5_wn1x"]
    res = by_id(compare(load_expected("weightnet"), recs))
    assert res["weightnet/t1_w0.5_base"]["status"] == "missing"
    assert "exit code 3: boom" in res["weightnet/t1_w0.5_base"]["reason"]


def test_reproduce_bad_table_is_a_user_error(capsys):
    assert reproduce.main(["weightnet", "--table", "t9", "--dry-run"]) == 2
    assert "valid tables: t1, t2, t3" in capsys.readouterr().err


def test_published_rounding_is_part_of_the_tolerance():
    from dyconv_repro.results.expected import matches_published, rounding_half_unit

    assert rounding_half_unit(1.4) == pytest.approx(0.05) and rounding_half_unit(41) == 0.5
    assert rounding_half_unit(312.9) == pytest.approx(0.05)
    assert matches_published(1.37, 1.4, 2)        # -2.1 %, but "1.4" covers [1.35, 1.45]
    assert not matches_published(1.34, 1.4, 2)
    assert matches_published(42.2, 41, 3) and not matches_published(42.3, 41, 3)  # 3 % wins over +-0.5
    assert not matches_published(6.43, 5.71, 2)


def test_compare_reports_the_final_top1_unless_best_is_asked(runs):
    final = by_id(compare(DOC, collect_runs(runs)))
    best = by_id(compare(DOC, collect_runs(runs), report="best"))
    assert final["toy/t1_base"]["ours_top1_mean"] == pytest.approx(70.2) and final["toy/t1_base"]["report"] == "final"
    assert best["toy/t1_base"]["ours_top1_mean"] == pytest.approx(70.7) and best["toy/t1_base"]["report"] == "best"


def test_final_top1_prefers_the_ema_the_recipe_ends_with():
    from dyconv_repro.results.compare import reported_top1

    class Run(dict):
        def get(self, k, d=None):
            return super().get(k, d)

    run = Run(final_top1=70.0, final_ema_top1=71.0, best_top1=71.5)
    assert (reported_top1(run), reported_top1(run, "final_raw"), reported_top1(run, "best")) == (71.0, 70.0, 71.5)
    assert reported_top1(Run(final_top1=70.0, best_top1=71.5)) == 70.0
