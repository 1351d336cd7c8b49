"""Bad input that used to train silently is refused with one UserError line, and a refused run leaves no
run directory behind (issue 23: silent wrong runs)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dyconv_repro.errors import UserError
from dyconv_repro.pipeline import train_run as train

from .conftest import run_cli

TINY = ["trainer.epochs=1", "trainer.max_steps_per_epoch=1", "recipe.batch_size=32"]


@pytest.mark.parametrize("overrides, fragment", [
    (["op=mixconv"], "op=mixconv with policy mixconv replaces none of the 19 convs of model resnet20"),
    (["model.width_mult=-1"], "model.width_mult must be > 0, got -1"),
    (["+trainer.epoch=3"], "unknown key trainer.epoch (did you mean trainer.epochs?)"),
])
def test_silent_wrong_runs_are_refused_and_leave_nothing(make_cfg, tmp_path, overrides, fragment):
    _refused_before_training(make_cfg, tmp_path, overrides, fragment)


def test_compiling_an_op_not_measured_against_eager_is_refused(make_cfg, tmp_path, monkeypatch):
    """A new operator is refused by `trainer.compile=true` until tests/test_compile.py has measured it."""
    from dyconv_repro.engine import compile_check

    monkeypatch.delitem(compile_check.COMPILE_VERIFIED, "dynamicconv")
    _refused_before_training(make_cfg, tmp_path, ["op=dynamicconv", "trainer.compile=true"],
                             "trainer.compile=true is refused for op=dynamicconv: its compiled training step "
                             "has not been checked against eager yet")


def _refused_before_training(make_cfg, tmp_path, overrides, fragment):
    with pytest.raises(UserError) as e:  # at composition (the schema) or when the run is built
        train(make_cfg(*TINY, *overrides))
    assert fragment in str(e.value), str(e.value)
    assert not any((tmp_path / "runs").rglob("config.yaml"))


def test_empty_surgery_names_the_way_to_accept_it(make_cfg):
    with pytest.raises(UserError, match=r"policy\.allow_empty=true"):
        train(make_cfg(*TINY, "op=mixconv"))
    summary = train(make_cfg(*TINY, "op=mixconv", "policy.allow_empty=true"))
    assert summary["status"] == "finished"


def test_cli_refusal_is_one_line_exit_2(tmp_path):
    proc = run_cli(["dyconv-train", "op=mixconv", f"output_dir={tmp_path / 'runs'}", *TINY], cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: op=mixconv"), proc.stderr
    assert not (tmp_path / "runs" / "resnet20-mixconv").exists()


def test_latest_points_at_the_newest_run(make_cfg):
    first = train(make_cfg(*TINY))
    second = train(make_cfg(*TINY))
    latest = Path(first["run_dir"]).parent / "latest"
    assert latest.is_symlink() and latest.resolve() == Path(second["run_dir"]).resolve()


def test_reproduce_checks_missing_data_once_before_launching(tmp_path, capsys):
    from dyconv_repro.cli import reproduce

    rc = reproduce.main(["weightnet", "--seeds", "3", "--runs", str(tmp_path / "runs"), "--train-cmd", "false",
                         "--", f"data.root={tmp_path / 'nowhere'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "runs").exists()  # nothing launched, no _failed/ stubs
