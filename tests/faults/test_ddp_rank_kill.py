"""Fault: one rank of a 2-process gloo DDP run (torchrun, CPU) is SIGKILLed after the first checkpoint. torchrun
stops the group; `trainer.resume=auto` with the same two processes finishes the run with the weights of an
uninterrupted 2-process run, bit for bit, one metrics row per epoch and no temp files."""

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
ARGS = ["trainer.device=cpu", "trainer.epochs=2", "trainer.max_steps_per_epoch=6", "recipe.batch_size=32",
        "trainer.checkpoint_every_steps=2", "trainer.progress=false", "run_name=ddp"]
STEPS = 12


def _torchrun(tmp_path, *extra) -> subprocess.Popen:
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "dyconv_repro.cli.train",
                             *ARGS, f"output_dir={tmp_path / 'runs'}", *extra], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_dir(tmp_path) -> Path:
    (d,) = [p for p in (tmp_path / "runs" / "ddp").iterdir() if not p.is_symlink()]
    return d


def _weights(d: Path) -> dict:
    return torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["model"]


def _workers(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_one_rank_killed_resumes_to_the_uninterrupted_weights(tmp_path):
    ref_dir = tmp_path / "reference"
    ref_dir.mkdir()
    ref = _torchrun(ref_dir)
    _, err = ref.communicate(timeout=600)
    assert ref.returncode == 0, err[-3000:]
    reference = _weights(_run_dir(ref_dir))

    run = tmp_path / "faulty"
    run.mkdir()
    first = _torchrun(run)
    deadline = time.time() + 300
    while time.time() < deadline and not list((run / "runs" / "ddp").glob("*/checkpoints/last.pt")):
        assert first.poll() is None, first.communicate()[1][-3000:]
        time.sleep(0.1)
    workers = _workers(first.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 1  # torchrun's own ChildFailedError report (its lines, not the trainer's)
    d = _run_dir(run)
    state = torch.load(d / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert 2 <= state["global_step"] < STEPS, state["global_step"]

    resumed = _torchrun(run, "trainer.resume=auto")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS and summary["world_size"] == 2
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not list(d.rglob("*.tmp")), list(d.rglob("*.tmp"))
    got = _weights(d)
    assert all(torch.equal(got[k], reference[k]) for k in reference), \
        [k for k in reference if not torch.equal(got[k], reference[k])][:5]
