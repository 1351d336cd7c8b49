"""Collect run directories: every `summary.json` under a runs folder, with its resolved `config.yaml`.

A run directory (written by the trainer) holds config.yaml, metrics.jsonl, summary.json and, when it
failed, error.txt. A run's experiment id is the summary's `experiment` (the Hydra choice of the
`experiment` group, e.g. "weightnet/t1_w1.0_wn1x"). A folder with an error.txt but no summary (a run
that died before writing one) is collected as failed too, so that nothing disappears silently.
Links are followed, so a Hydra sweep dir (whose job folders link to their runs) collects that sweep.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_FAILED = ("failed", "interrupted")


@dataclass
class RunRecord:
    """One run directory as compare needs it."""

    run_dir: Path
    experiment: str | None
    status: str
    seed: int | None
    stage: str | None
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.status in _FAILED or (self.error is not None and self.status != "finished")

    def get(self, key: str, default=None):
        """A summary field, falling back to the dotted key in the resolved config."""
        if self.summary.get(key) is not None:
            return self.summary[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node if node is not None else default


def _read_yaml(path: Path) -> dict:
    try:
        return yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def read_run(run_dir: Path) -> RunRecord:
    """One run directory (summary.json and/or error.txt)."""
    run_dir = Path(run_dir)
    summary: dict = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            summary = {"status": "failed", "error": f"unreadable summary.json ({e})"}
    config = _read_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    error = None
    if (run_dir / "error.txt").is_file():
        error = _last_line((run_dir / "error.txt").read_text(errors="replace")) or "error.txt (empty)"
    elif summary.get("error"):
        error = str(summary["error"])
    status = str(summary.get("status") or ("failed" if error else "unknown"))
    experiment = summary.get("experiment") or config.get("experiment_id")
    seed = summary.get("seed", config.get("seed"))
    stage = summary.get("stage") or config.get("stage")
    return RunRecord(run_dir, experiment, status, None if seed is None else int(seed), stage, summary, config, error)


def run_dirs(root: Path) -> list[Path]:
    """Folders under `root` holding a summary.json or error.txt, each run once: symlinks are followed (a
    sweep's `<job>/run` links, `runs/<name>/latest`), and a run reached both directly and through a link is
    listed under its direct path."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        direct = real == os.path.realpath(root) or not _through_link(Path(dirpath), root)
        if real in found and not direct:
            dirnames[:] = []  # already seen (and a link cycle ends here)
            continue
        if "summary.json" in filenames or "error.txt" in filenames:
            if real not in found or direct:
                found[real] = Path(dirpath)
    return sorted(found.values())


def _through_link(path: Path, root: Path) -> bool:
    rel = path.relative_to(root)
    return any((root / Path(*rel.parts[:i + 1])).is_symlink() for i in range(len(rel.parts)))


def collect_runs(runs_dir: str | Path) -> list[RunRecord]:
    """Every run under `runs_dir` (any depth, through links: a sweep dir's jobs link to their runs), sorted by path."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    return [read_run(d) for d in run_dirs(root)]
