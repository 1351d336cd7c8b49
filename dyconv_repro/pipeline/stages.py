"""Multi-stage runs as one command (e.g. RefConv: train the baseline, then refocus it).

An experiment may declare

    pipeline:
      - {name: baseline, overrides: [op=conv, policy=none, recipe=refconv_baseline]}
      - {name: refocus, init_from: baseline}        # model.init_from = baseline's best.pt

Each stage is the experiment's own config plus the stage's Hydra overrides, trained in
runs/<run_name>/<stage>/<run_id>. `init_from: <stage>` points `model.init_from` at that stage's
checkpoint (`init_ckpt: best|last`, default best). If the user already gave `model.init_from`,
the stages that would only produce it are skipped: the pipeline takes the existing checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from dyconv_repro.config import compose, validate
from dyconv_repro.errors import UserError
from dyconv_repro.pipeline.train import train_run

log = logging.getLogger("dyconv")


def _task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001
        return []


def _compose_stage(cfg: DictConfig, base_overrides: list[str], overrides: list[str]) -> DictConfig:
    """The run's config with the stage's overrides: recomposed through Hydra from the run's own
    command-line overrides, so group changes (op=conv, recipe=...) work like on the command line."""
    if not overrides:
        return validate(OmegaConf.create(OmegaConf.to_container(cfg, resolve=False)))
    return compose(base_overrides + list(overrides))


def run_pipeline(cfg: DictConfig, base_overrides: list[str] | None = None) -> dict:
    """Train `cfg`, or each of its pipeline stages in order. `base_overrides` are the overrides
    `cfg` was composed with (default: the current Hydra job's)."""
    cfg = validate(cfg)
    stages = cfg.pipeline
    if not stages:
        return train_run(cfg)
    base_overrides = _task_overrides() if base_overrides is None else list(base_overrides)
    user_init = cfg.model.init_from
    consumed = {s.get("init_from") for s in stages if s.get("init_from")}
    outputs: dict[str, Path] = {}
    summary: dict = {}
    for stage in stages:
        name = str(stage.name)
        if user_init and name in consumed:
            log.info("pipeline: skipping stage %r, using model.init_from=%s", name, user_init)
            continue
        scfg = _compose_stage(cfg, base_overrides, list(stage.get("overrides") or []))
        with open_dict(scfg):
            scfg.pipeline = None
            scfg.run_name = f"{cfg.run_name}/{name}"
            scfg.experiment_id = cfg.experiment_id
            scfg.stage = name
            if cfg.run_id:
                scfg.run_id = cfg.run_id
            src = stage.get("init_from")
            if src and not user_init:
                if src not in outputs:
                    raise UserError(f"pipeline stage {name!r} starts from {src!r}, which has not run")
                which = str(stage.get("init_ckpt", "best"))
                scfg.model.init_from = str(outputs[src] / "checkpoints" / f"{which}.pt")
            elif src and user_init:
                scfg.model.init_from = user_init
        log.info("pipeline: stage %r", name)
        summary = train_run(scfg)
        outputs[name] = Path(summary["run_dir"])
    return summary
