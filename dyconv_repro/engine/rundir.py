"""Run directories: runs/<run_name>/<run_id>/ with config.yaml, metrics.jsonl, summary.json, checkpoints/.

run_id is unique even when many runs start in the same second (microseconds + job id + pid).
`trainer.resume=auto` finds the newest unfinished run directory of the same run_name whose
config equals this one (ignoring trainer.resume and run_id) and continues it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

_IGNORED_FOR_MATCH = ("trainer.resume", "run_id", "trainer.progress", "trainer.checkpoint_every_steps")


def new_run_id() -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID") or ""
    task = os.environ.get("SLURM_ARRAY_TASK_ID") or os.environ.get("SLURM_PROCID") or ""
    parts = [stamp] + [p for p in (job, task) if p] + [str(os.getpid())]
    return "-".join(parts)


def claim_new_run_dir(base: Path, run_id: str | None = None) -> Path:
    """Create and return a run directory nobody else has: mkdir without exist_ok is atomic, so two runs
    that computed the same id (same microsecond and pid on two hosts, or an explicit run_id) never share
    one; the loser gets a -1, -2, ... suffix."""
    base.mkdir(parents=True, exist_ok=True)
    stem = run_id or new_run_id()
    for i in range(1000):
        cand = base / (stem if i == 0 else f"{stem}-{i}")
        try:
            cand.mkdir()
        except FileExistsError:
            continue
        (cand / "checkpoints").mkdir()
        return cand
    raise RuntimeError(f"could not create a fresh run directory under {base} for {stem}")


def comparable_config(cfg: DictConfig) -> dict:
    """The config as a plain dict without the keys that legitimately change on resume."""
    c = OmegaConf.to_container(cfg, resolve=True)
    for dotted in _IGNORED_FOR_MATCH:
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    c.pop("hydra", None)
    return c


def find_resumable(base: Path, cfg: DictConfig) -> Path | None:
    """Newest run dir under `base` with checkpoints/last.pt, not finished, and the same config."""
    if not base.is_dir():
        return None
    want = comparable_config(cfg)
    candidates = sorted((p.parent.parent for p in base.glob("*/checkpoints/last.pt")),
                        key=lambda d: (d / "checkpoints" / "last.pt").stat().st_mtime, reverse=True)
    for run_dir in candidates:
        summary = run_dir / "summary.json"
        if summary.is_file():
            try:
                if json.loads(summary.read_text()).get("status") == "finished":
                    continue
            except json.JSONDecodeError:
                pass
        cfg_file = run_dir / "config.yaml"
        if cfg_file.is_file() and comparable_config(OmegaConf.load(cfg_file)) == want:
            return run_dir
    return None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: torch.device, world_size: int = 1) -> str:
    """One line: the accelerator (or CPU) of this process, and how many processes train together."""
    procs = f", {world_size} processes" if world_size > 1 else ""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{torch.cuda.device_count()} visible{procs}"
    return (f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads "
            f"({socket.gethostname()}){procs}")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def append_jsonl(path: Path, obj) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
