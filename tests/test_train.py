"""The foundation: compose -> train -> run directory, exact resume, multirun, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dyconv_repro.engine.hooks import Hook
from dyconv_repro.errors import UserError
from dyconv_repro.pipeline import train_run as train

from .conftest import run_cli

TINY = ["trainer.epochs=2", "trainer.max_steps_per_epoch=3", "recipe.batch_size=32"]


def real_paths(paths) -> list[Path]:
    """The paths that are not reached through a `runs/<run_name>/latest` link."""
    return [p for p in paths if not any(q.is_symlink() for q in p.parents)]


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def test_default_run_writes_run_directory(make_cfg):
    cfg = make_cfg(*TINY)
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all("val_top1" in r and "train_loss" in r and "lr" in r for r in lines)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["status"] == "finished" and saved["epochs"] == 2 and saved["steps"] == 6
    for key in ("best_top1", "best_top5", "final_top1", "params", "wall_time_s", "images_per_s", "device",
                "torch", "git_commit", "hardware", "cpu_heap"):
        assert key in saved, key
    assert saved["params"] > 0
    assert saved["cpu_heap"].startswith("keep"), saved["cpu_heap"]  # trainer.cpu_heap's default on CPU


class _KillAt(Hook):
    """A hook that simulates a kill (KeyboardInterrupt) when the global step reaches `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_start(self, trainer):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt

    def extra_losses(self, trainer):
        return {}

    def epoch_metrics(self, trainer):
        return {}

    def no_decay_params(self, model):
        return []


def run_killed(make_cfg, monkeypatch, args, kill_step, run_name="killed") -> dict:
    """Train until `kill_step` and 'kill' the run; returns the state of its last checkpoint."""
    import dyconv_repro.pipeline.train as trainer_mod

    real = trainer_mod.build_hooks
    monkeypatch.setattr(trainer_mod, "build_hooks", lambda recipe: real(recipe) + [_KillAt(kill_step)])
    cfg = make_cfg(*args, f"run_name={run_name}")
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(trainer_mod, "build_hooks", real)
    (last,) = real_paths((Path(cfg.output_dir) / run_name).glob("*/checkpoints/last.pt"))
    assert json.loads((last.parent.parent / "summary.json").read_text())["status"] == "interrupted"
    return torch.load(last, weights_only=False)


def run_killed_then_resumed(make_cfg, monkeypatch, args, kill_step, run_name="killed"):
    """`run_killed`, then `trainer.resume=auto`; returns (ckpt state, summary)."""
    state = run_killed(make_cfg, monkeypatch, args, kill_step, run_name)
    return state, train(make_cfg(*args, f"run_name={run_name}", "trainer.resume=auto"))


@pytest.mark.parametrize("every, kill_step, expect", [(0, 4, (1, 0, 4)), (2, 6, (1, 2, 6))],
                         ids=["epoch-boundary", "mid-epoch"])
def test_killed_run_resumes_exactly(make_cfg, monkeypatch, every, kill_step, expect):
    args = ["trainer.epochs=2", "trainer.max_steps_per_epoch=4", "recipe.batch_size=32",
            f"trainer.checkpoint_every_steps={every}", "model.dropout=0.1"]
    full = train(make_cfg(*args, "run_name=full"))
    state, resumed = run_killed_then_resumed(make_cfg, monkeypatch, args, kill_step)
    assert (state["epoch"], state["batch_in_epoch"], state["global_step"]) == expect
    assert resumed["status"] == "finished" and resumed["steps"] == full["steps"]
    a, b = _weights(Path(full["run_dir"])), _weights(Path(resumed["run_dir"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("override, fragment", [
    ("recipe.batch_size=0", "recipe.batch_size must be > 0, got 0"),
    ("trainer.epochs=-1", "trainer.epochs must be > 0, got -1"),
    ("model.name=resnet21", "Valid backbones"),
    ("data=cifar10", "data.download=true"),
    ("trainer.cpu_heap=tcmalloc", "trainer.cpu_heap must be one of keep, default"),
])
def test_bad_input_is_one_clear_error(make_cfg, tmp_path, override, fragment):
    extra = [f"data.root={tmp_path / 'nowhere'}"] if override == "data=cifar10" else []
    with pytest.raises(UserError, match=fragment.replace(".", r"\.")):
        train(make_cfg(*TINY, override, *extra))


def test_checkpoint_of_other_architecture_names_keys(make_cfg):
    from dyconv_repro.engine.checkpoint import load_model_state_strict
    from dyconv_repro.models.build import build_model

    a = build_model(make_cfg("model=resnet20"))
    cfg = make_cfg("model=resnet20", "model.name=resnet32")
    b = build_model(cfg)
    with pytest.raises(UserError, match=r"missing: .*layer1\.3"):
        load_model_state_strict(b, a.state_dict())


def test_cli_bad_input_prints_one_line(tmp_path):
    proc = run_cli(["dyconv-train", "model.name=nonexistent_net", f"output_dir={tmp_path}"], cwd=tmp_path)
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: unknown backbone 'nonexistent_net'"), proc.stderr
    assert "resnet20" in err[0]


def test_multirun_gives_two_run_directories(tmp_path):
    proc = run_cli(["dyconv-train", "-m", "recipe.lr=0.05,0.1", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
                    "recipe.batch_size=32", "trainer.progress=false", f"output_dir={tmp_path}/runs"],
                   cwd=tmp_path, check=True)
    summaries = sorted(real_paths((tmp_path / "runs").glob("*/*/summary.json")))
    assert len(summaries) == 2, proc.stdout
    lrs = sorted(json.loads((s.parent / "config.yaml").read_text().split("lr:")[1].split("\n")[0]) for s in summaries)
    assert lrs == [0.05, 0.1]


def test_torchrun_two_cpu_ranks_agree(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "dyconv_repro.cli.train",
                           "trainer.device=cpu", "trainer.epochs=1", "trainer.max_steps_per_epoch=3",
                           "recipe.batch_size=32", "trainer.progress=false", f"output_dir={tmp_path}/runs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (summary,) = real_paths((tmp_path / "runs").glob("*/*/summary.json"))
    s = json.loads(summary.read_text())
    assert s["status"] == "finished" and s["world_size"] == 2
    assert len(s["rank_weight_checksums"]) == 2 and len(set(s["rank_weight_checksums"])) == 1


def _start_train(tmp_path, *extra):
    exe = Path(sys.executable).parent / "dyconv-train"
    args = [str(exe), "trainer.epochs=2", "trainer.checkpoint_every_steps=2", "recipe.batch_size=32",
            "trainer.max_steps_per_epoch=12", "trainer.progress=false", "run_name=signals",
            f"output_dir={tmp_path}/runs", *extra]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"})


def _wait_for_checkpoint(proc, tmp_path, min_step=4, timeout=120.0):
    """Poll until last.pt holds a mid-run step >= min_step; returns its run dir."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"the run ended before it could be signalled:\n{proc.stdout.read()[-3000:]}"
        for last in real_paths((tmp_path / "runs").glob("signals/*/checkpoints/last.pt")):
            try:
                step = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
            except Exception:  # noqa: BLE001 - the atomic rename may race the glob; poll again
                continue
            if step >= min_step:
                return last.parent.parent
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("no mid-run checkpoint appeared")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_real_signal_then_resume_auto(tmp_path, sig):
    """A real SIGTERM writes a checkpoint and exits 143; after SIGKILL the periodic checkpoint survives;
    either way `trainer.resume=auto` continues from last.pt and finishes all epochs exactly once."""
    import signal

    proc = _start_train(tmp_path)
    run_dir = _wait_for_checkpoint(proc, tmp_path)
    proc.send_signal(getattr(signal, sig))
    out = proc.communicate(timeout=120)[0]
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    if sig == "SIGTERM":
        assert proc.returncode == 143, out[-3000:]
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
        assert "checkpoint written" in out
    else:
        assert proc.returncode == -signal.SIGKILL
    stopped_at = state["global_step"]
    assert 0 < stopped_at < 2 * 12

    resumed = _start_train(tmp_path, "trainer.resume=auto")
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out[-3000:]
    assert f"step {stopped_at})" in out and f"resumed from {run_dir}" in out, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epochs"] == 2
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]  # no epoch lost or repeated
    assert [r["step"] for r in records] == [12, 24] and summary["steps"] == 24


def _claim(args):
    from dyconv_repro.engine.rundir import claim_new_run_dir

    base, run_id = args
    return str(claim_new_run_dir(Path(base), run_id))


def test_concurrent_runs_never_share_a_run_directory(tmp_path):
    """8 processes claiming at once get 8 directories, also when they computed the same run id."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(4) as pool:
        fresh = pool.map(_claim, [(tmp_path / "a", None)] * 8)
        same_id = pool.map(_claim, [(tmp_path / "b", "fixed-id")] * 8)
    for dirs in (fresh, same_id):
        assert len(set(dirs)) == 8 and all((Path(d) / "checkpoints").is_dir() for d in dirs)
    assert sorted(Path(d).name for d in same_id)[0] == "fixed-id"


def test_a_forked_child_does_not_keep_the_run_directory_lock(tmp_path):
    """DataLoader workers are forked from the trainer; when it is SIGKILLed they live on for a few seconds.
    They must not hold its run-directory lock, or an immediate resume is refused."""
    import multiprocessing
    import time

    from dyconv_repro.engine.rundir import lock_run_dir, unlock_run_dir

    fd = lock_run_dir(tmp_path)
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
    child.start()
    try:
        unlock_run_dir(fd)  # the trainer is gone; only its forked child lives
        probe = subprocess.run([sys.executable, "-c", "import sys; from dyconv_repro.engine.rundir import "
                                "lock_run_dir; lock_run_dir(__import__('pathlib').Path(sys.argv[1]))", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, probe.stderr[-2000:]
    finally:
        child.kill()
        child.join()
