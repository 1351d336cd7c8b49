"""Fault injection (slow tier): each case injects one fault into a real `dyconv-train` process, then
resumes with `trainer.resume=auto` and checks that nothing was lost: the final weights equal an
uninterrupted run's bit for bit, no temp file is left, metrics.jsonl has one row per epoch, the summary
says what happened, and the faulty process printed one line on stderr (no traceback) with its
documented exit code. FAULTS is the table of the issue-23 closing note."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ARGS = ["trainer.epochs=2", "trainer.max_steps_per_epoch=4", "recipe.batch_size=32", "trainer.checkpoint_every_steps=2",
        "model.dropout=0.1", "trainer.progress=false", "run_name=f"]
STEPS = 8


def driver_env(fault: str | None = None) -> dict:
    """The environment of a driver process: one thread, offline, this checkout, `fault` (or none) injected."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    env.pop("FAULT", None)
    if fault:
        env["FAULT"] = fault
    return env


def train(tmp_path, *extra, fault: str | None = None, timeout=300):
    return subprocess.run([sys.executable, "-m", "tests.faults.driver", *ARGS, f"output_dir={tmp_path / 'runs'}",
                           *extra], cwd=REPO, env=driver_env(fault), capture_output=True, text=True, timeout=timeout)


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def run_dir(tmp_path) -> Path:
    (d,) = [p for p in (tmp_path / "runs" / "f").iterdir() if not p.is_symlink()]
    return d


def weights(d: Path) -> dict:
    return torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    proc = train(tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return weights(run_dir(tmp))


def check_recovered(tmp_path, reference, first, code: int, status: str, line: str, *extra: str):
    """`first` (the faulty process) exited `code` with one line containing `line` (or was killed: code<0);
    then resume=auto finishes the run with nothing lost."""
    assert first.returncode == code, (first.returncode, first.stderr[-3000:])
    if code > 0:
        lines = error_lines(first)
        assert len(lines) == 1 and line in lines[0], first.stderr[-3000:]
        assert json.loads((run_dir(tmp_path) / "summary.json").read_text())["status"] == status
        if status == "failed":
            assert (run_dir(tmp_path) / "error.txt").read_text().strip().splitlines()[-1] == lines[0]
    resumed = train(tmp_path, *extra, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    d = run_dir(tmp_path)
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(d.rglob("*.tmp")), list(d.rglob("*.tmp"))
    got = weights(d)
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    return resumed


# case -> (FAULT, exit code of the faulty process, summary status, text of its one stderr line)
FAULTS = {
    "SIGKILL inside the 3rd checkpoint write": ("kill:ckpt:3", -9, None, None),
    "SIGKILL inside a summary write": ("kill:summary:3", -9, None, None),
    "SIGKILL right before a metrics row": ("kill:metrics:2", -9, None, None),
    "ENOSPC in the 3rd checkpoint write": ("enospc:ckpt:3", 1, "failed", "no space left on device writing"),
    "ENOSPC in a summary write": ("enospc:summary:3", 1, "failed", "no space left on device writing"),
    "ENOSPC in a metrics append": ("enospc:metrics:1", 1, "failed", "no space left on device writing"),
    "NaN loss at step 6": ("nan:loss:6", 1, "failed", "loss is nan at step 5"),
}


@pytest.mark.parametrize("case", list(FAULTS))
def test_injected_fault_loses_nothing(tmp_path, reference, case):
    fault, code, status, line = FAULTS[case]
    first = train(tmp_path, fault=fault)
    check_recovered(tmp_path, reference, first, code, status, line)


def _start(tmp_path):
    return subprocess.Popen([sys.executable, "-m", "tests.faults.driver", *ARGS, "trainer.max_steps_per_epoch=40",
                             "trainer.epochs=1", f"output_dir={tmp_path / 'runs'}"], cwd=REPO, env=driver_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _after_first_checkpoint(tmp_path, proc):
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        lasts = list((tmp_path / "runs" / "f").glob("*/checkpoints/last.pt"))
        if lasts:
            return
        time.sleep(0.1)
    raise AssertionError("no checkpoint")


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_writes_checkpoint_and_one_line(tmp_path, sig, code):
    proc = _start(tmp_path)
    _after_first_checkpoint(tmp_path, proc)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == code and len(lines) == 1 and lines[0].startswith(f"{sig}: checkpoint written"), err
    d = run_dir(tmp_path)
    state = torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert 2 <= state["global_step"] < 40  # the partial epoch
    assert json.loads((d / "summary.json").read_text())["status"] == "interrupted"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_unreadable_last_falls_back_to_previous(tmp_path, reference, damage):
    first = train(tmp_path, "trainer.epochs=1")  # epoch 1 done: last.pt (step 4) and prev.pt (step 2)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir(tmp_path) / "checkpoints" / "last.pt"
    (run_dir(tmp_path) / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "garbage":
        last.write_bytes(b"not a checkpoint")
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    # trainer.epochs=1 ran with a different config; resume the 2-epoch run from its directory explicitly
    resumed = train(tmp_path, f"trainer.resume={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from the previous checkpoint" in resumed.stdout and (last.parent / "last.pt.corrupt").is_file()


def test_unreadable_last_without_previous_says_how_to_go_on(tmp_path):
    first = train(tmp_path, "trainer.epochs=1", "trainer.checkpoint_every_steps=0")
    assert first.returncode == 0
    d = run_dir(tmp_path)
    (d / "checkpoints" / "prev.pt").unlink(missing_ok=True)
    (d / "checkpoints" / "last.pt").write_bytes(b"garbage")
    proc = train(tmp_path, f"trainer.resume={d / 'checkpoints' / 'last.pt'}")
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "no previous checkpoint to fall back to" in lines[0], proc.stderr


def test_second_process_on_the_same_run_dir_is_refused(tmp_path):
    from dyconv_repro.engine.rundir import lock_run_dir, unlock_run_dir

    first = train(tmp_path, fault="kill:ckpt:3")
    assert first.returncode == -9
    fd = lock_run_dir(run_dir(tmp_path))  # a live process (this one) resuming it
    try:
        proc = train(tmp_path, "trainer.resume=auto")
    finally:
        unlock_run_dir(fd)
    lines = error_lines(proc)
    assert proc.returncode == 2 and len(lines) == 1 and "is in use by another process" in lines[0], proc.stderr


def test_resume_auto_on_a_finished_run_trains_nothing(tmp_path):
    assert train(tmp_path).returncode == 0
    proc = train(tmp_path, "trainer.resume=auto")
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stdout[-2000:]
    assert len([p for p in (tmp_path / "runs" / "f").iterdir() if not p.is_symlink()]) == 1


def test_kill_with_bn_recalibration_resumes_bit_exact(tmp_path):
    """With BN recalibration before each evaluation (it draws training batches and rewrites the BN buffers), a
    run killed in epoch 2, after a recalibrated evaluation, resumes to the uninterrupted weights."""
    recal = "trainer.bn_recalibrate=2"
    ref = train(tmp_path / "ref", recal)
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = weights(run_dir(tmp_path / "ref"))
    first = train(tmp_path, recal, fault="kill:ckpt:4")  # the 4th checkpoint write: inside epoch 2
    check_recovered(tmp_path, reference, first, -9, None, None, recal)


@pytest.mark.parametrize("seed, workers", [(0, 0), (1, 0), (2, 2)], ids=["t0", "t1", "t2-workers2"])
def test_sigkill_at_a_random_moment_loses_nothing(tmp_path, reference, seed, workers):
    """SIGKILL after a random delay (anywhere: start-up, a step, a checkpoint or summary write, evaluation).
    The resumed run still ends at the uninterrupted weights, also with data.num_workers=2: each sample's
    augmentation is seeded by its position (data/seeded.py), so the data does not depend on the workers."""
    import random

    extra = [f"data.num_workers={workers}"]
    proc = subprocess.Popen([sys.executable, "-m", "tests.faults.driver", *ARGS, f"output_dir={tmp_path / 'runs'}",
                             *extra], cwd=REPO, env=driver_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "runs" / "f").is_dir():  # the run directory exists: start-up is over
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    delay = random.Random(seed).uniform(0.0, 2.0)  # the run trains for about 3.5 s after that
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    print(f"random kill after {delay:.2f} s")  # shown with -s
    assert proc.returncode == -9, f"the run ended before the kill {delay:.2f} s in (exit {proc.returncode})"
    check_recovered(tmp_path, reference, proc, -9, None, None, *extra)
