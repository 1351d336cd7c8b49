"""`train_run(cfg)`: one run from a composed config -- the trainer is handed the model and the paper hooks.

The config is validated first (config/validate.py); the model is built here (so the same code builds it for
training, `dyconv-complexity` and `dyconv-eval`), with the surgery's record of replaced layers and the
complexity count going into the run's summary.json. After training, a hook that asks for it
(`deploy_after_training`, RefConv's refocus) gets the deploy stage: deployed.pt + deploy.json in the run dir.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from dyconv_repro.analysis.complexity import complexity_report
from dyconv_repro.config import validate
from dyconv_repro.engine.distributed import launch_rank
from dyconv_repro.engine.hooks import build_hooks
from dyconv_repro.engine.trainer import Trainer, seed_all
from dyconv_repro.errors import UserError
from dyconv_repro.models.build import build_model_with_report
from dyconv_repro.models.surgery import replaced_layers

log = logging.getLogger("dyconv")


def _complexity(model, image_size: int) -> dict:
    params = sum(p.numel() for p in model.parameters())
    out = {"params": params, "madds": None, "deploy_params": None, "deploy_madds": None}
    try:
        rep = complexity_report(model, image_size)
        out.update({k: rep.get(k) for k in out})
    except Exception as e:  # noqa: BLE001 - complexity is a report, never a reason to stop training
        log.warning("complexity count failed (%s: %s); params only", type(e).__name__, e)
    finally:
        model.train()
    return out


def train_run(cfg: DictConfig) -> dict:
    """Train one run described by a composed config; returns the summary."""
    cfg = validate(cfg)
    if cfg.trainer.evaluate_only and not (cfg.model.init_from or cfg.model.pretrained):
        row = f" (the header of configs/experiment/{cfg.experiment_id}.yaml names it)" if cfg.experiment_id else ""
        raise UserError("trainer.evaluate_only evaluates trained weights: set model.init_from=<checkpoint or run "
                        f"dir of the trained model>{row}, or model.pretrained=true")
    seed_all(int(cfg.seed))  # the model's initialization depends on the seed
    model, reports = build_model_with_report(cfg, verbose=launch_rank() == 0)
    hooks = build_hooks(cfg.recipe)
    record = replaced_layers(reports)
    if launch_rank() == 0:
        record.update(_complexity(model, int(cfg.data.image_size)))
    else:
        record["params"] = sum(p.numel() for p in model.parameters())
    trainer = Trainer(cfg, model, hooks, record)
    summary = trainer.run()
    if (summary.get("status") == "finished" and "deploy" not in summary and trainer.info.is_main
            and any(getattr(h, "deploy_after_training", False) for h in hooks)):
        from dyconv_repro.pipeline.deploy import save_deployed

        summary["deploy"] = save_deployed(cfg, trainer.raw_model, trainer.val_loader, trainer.device, trainer.run_dir)
        trainer.write_summary(summary)
    return summary
