"""Metric sinks. Local files are the source of truth; wandb only mirrors them and never stops training."""

from __future__ import annotations

import logging
from pathlib import Path

from dyconv_repro.engine.rundir import append_jsonl

log = logging.getLogger("dyconv")


class LocalLogger:
    """metrics.jsonl: one JSON line per epoch (train metrics) and per evaluation."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "metrics.jsonl"

    def log(self, record: dict) -> None:
        append_jsonl(self.path, record)

    def summary(self, summary: dict) -> None:  # summary.json is written by the trainer
        pass

    def close(self) -> None:
        pass


class WandbLogger:
    """Mirror to Weights & Biases (offline unless logger.mode=online). Errors are logged, not raised."""

    def __init__(self, cfg, run_dir: Path, config: dict, resume_id: str | None = None):
        self.run = None
        try:
            import wandb

            self.run = wandb.init(project=cfg.project or "dyconv-repro", entity=cfg.entity,
                                  mode=cfg.mode, dir=str(run_dir), config=config,
                                  name=str(run_dir.relative_to(run_dir.parent.parent)), id=resume_id,
                                  resume="allow", tags=list(cfg.get("tags") or []), reinit=True)
        except Exception as e:  # noqa: BLE001
            log.warning("wandb disabled (init failed: %s); local files are still written", e)

    @property
    def run_id(self) -> str | None:
        return getattr(self.run, "id", None)

    def log(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float))})
        except Exception as e:  # noqa: BLE001
            log.warning("wandb log failed: %s", e)

    def summary(self, summary: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        except Exception as e:  # noqa: BLE001
            log.warning("wandb summary failed: %s", e)

    def close(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("wandb finish failed: %s", e)


class MultiLogger:
    def __init__(self, loggers):
        self.loggers = list(loggers)

    def log(self, record: dict) -> None:
        for lg in self.loggers:
            lg.log(record)

    def summary(self, summary: dict) -> None:
        for lg in self.loggers:
            lg.summary(summary)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
