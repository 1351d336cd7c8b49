"""Run directories: runs/<run_name>/<run_id>/ with config.yaml, metrics.jsonl, summary.json, checkpoints/.

run_id is unique even when many runs start in the same second (microseconds + job id + pid).
`trainer.resume=auto` finds the newest run directory of the same run_name whose config equals this
one (ignoring trainer.resume and run_id): it continues it, reports that it has finished, or starts it
over in place when it died before its first checkpoint.

A process holds an exclusive lock on the run directory it trains in (`.lock`, flock: the kernel drops it
when the process dies), so two processes never write one directory; the holder may delete the temp files
of interrupted atomic writes. `runs/<run_name>/latest` links to the newest started run; in a Hydra
multirun each job's folder links to its run (`<sweep dir>/<job>/run`).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from dyconv_repro.errors import UserError

log = logging.getLogger("dyconv")

LATEST = "latest"
LOCK = ".lock"
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


def _last_activity(run_dir: Path) -> float:
    files = [run_dir / "checkpoints" / "last.pt", run_dir / "config.yaml"]
    return max((f.stat().st_mtime for f in files if f.is_file()), default=0.0)


def find_resumable(base: Path, cfg: DictConfig) -> Path | None:
    """The newest run directory under `base` (not the `latest` link) whose config equals this one."""
    if not base.is_dir():
        return None
    want = comparable_config(cfg)
    dirs = [d for d in base.iterdir() if d.is_dir() and not d.is_symlink() and (d / "config.yaml").is_file()]
    for run_dir in sorted(dirs, key=_last_activity, reverse=True):
        if comparable_config(OmegaConf.load(run_dir / "config.yaml")) == want:
            return run_dir
    return None


def read_status(run_dir: Path) -> str | None:
    """summary.json's status, None when there is no readable summary."""
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


_HELD_LOCKS: set[int] = set()


def _drop_locks_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies of the run-directory locks. A flock belongs to
    the open file, which fork shares, so otherwise workers orphaned by a SIGKILL of the trainer would hold
    the lock until they notice (up to 5 s), and an immediate `resume=auto` would be refused."""
    for fd in _HELD_LOCKS:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def lock_run_dir(run_dir: Path) -> int:
    """Take the run directory's exclusive lock for the life of this process (returns the fd; release it with
    `unlock_run_dir`). Another live process holding it: UserError naming it."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UserError(f"run directory {run_dir} is in use by another process ({holder}); wait for it to end "
                        "or stop it, or start a separate run without trainer.resume") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    _HELD_LOCKS.add(fd)
    return fd


def unlock_run_dir(fd: int) -> None:
    """Release what `lock_run_dir` took."""
    _HELD_LOCKS.discard(fd)
    os.close(fd)


def remove_temp_files(run_dir: Path) -> list[Path]:
    """Delete what interrupted atomic writes left (*.tmp in the run dir and checkpoints/). Only the holder
    of the run directory's lock may call this: no other process can be writing them."""
    found = [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.glob("*.tmp")]
    found += [p for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.glob(".*.tmp")]
    for p in found:
        p.unlink(missing_ok=True)
    return sorted(set(found))


def _link(target: str, link: Path) -> None:
    """Point the symlink `link` at `target`, replacing an older link atomically."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def point_latest(run_dir: Path) -> None:
    """runs/<run_name>/latest -> run_dir (relative, so the runs folder can move)."""
    try:
        _link(run_dir.name, run_dir.parent / LATEST)
    except OSError as e:  # e.g. a filesystem without symlinks: a convenience, never a reason to stop
        log.warning("could not point %s at %s (%s)", run_dir.parent / LATEST, run_dir.name, e)


def link_sweep_job(run_dir: Path, stage: str | None = None) -> Path | None:
    """In a Hydra multirun: <sweep dir>/<job num>/run (run-<stage> in a pipeline) -> run_dir, so that
    `dyconv-compare --sweep <sweep dir>` finds exactly this sweep's runs."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode != RunMode.MULTIRUN:
            return None
        job_dir = Path(hc.runtime.output_dir)
    except Exception:  # noqa: BLE001 - not under Hydra (called from Python), or a single run
        return None
    job_dir.mkdir(parents=True, exist_ok=True)
    link = job_dir / ("run" if not stage else f"run-{stage}")
    try:
        _link(os.path.relpath(run_dir.resolve(), job_dir.resolve()), link)
    except OSError as e:
        log.warning("could not link %s to %s (%s)", link, run_dir, e)
        return None
    return link


def drop_metrics_after(path: Path, epoch: int) -> None:
    """Keep only metrics.jsonl rows of epochs <= `epoch` (the checkpoint a run resumes from): what a killed
    run logged after its checkpoint is trained, and logged, again. A torn last line goes too."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            changed = True
            continue
        if isinstance(row, dict) and int(row.get("epoch", 0) or 0) > epoch:
            changed = True
            continue
        kept.append(line)
    if changed:
        write_text_atomic(path, "".join(x + "\n" for x in kept))


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a per-process temp file + rename; a failed write (a full disk) removes its temp file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


def append_jsonl(path: Path, obj) -> None:
    with path.open("a") as f:
        f.write(json.dumps(obj, default=str) + "\n")
