"""Deploying a trained run: transform (models/deploy.py), verify the logits, count, evaluate, save.

Used by `dyconv-deploy` and as the pipeline's post-training stage for recipes whose hooks ask for it
(RefConv's refocus: the deliverable is the re-parameterized plain conv)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dyconv_repro.analysis.complexity import count_madds
from dyconv_repro.engine.checkpoint import load_model_state_strict, save_atomic
from dyconv_repro.engine.evaluate import evaluate
from dyconv_repro.errors import UserError
from dyconv_repro.models.build import build_model
from dyconv_repro.models.deploy import baseline_config, decompose_mode, decomposition_report, deploy_transform
from dyconv_repro.ops import walkers

log = logging.getLogger("dyconv")


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in batches])


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def deploy_model(cfg: DictConfig, model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                 tolerance: float = 1e-4, data_loader=None, decompose: str | bool = "auto") -> tuple[nn.Module, dict]:
    """eval -> deep copy -> decompose / reparameterize -> verify logits on `batches` -> report."""
    model = model.to(device).eval()
    deployed = deploy_transform(model, decompose).to(device).eval()
    batches = [b.to(device) for b in batches]
    before, after = _logits(model, batches), _logits(deployed, batches)
    max_diff = (before - after).abs().max().item()
    report = {"max_abs_logit_diff": max_diff, "tolerance": tolerance, "params_before": _count(model),
              "params_after": _count(deployed), "decompose": decompose_mode(decompose)}
    if walkers.structured_layers(model):
        report["decomposition"] = decomposition_report(model)
    try:
        size = int(cfg.data.image_size)
        report.update(madds_before=count_madds(model, size), madds_after=count_madds(deployed, size))
    except Exception as e:  # noqa: BLE001 - a report field, not a reason to fail
        log.warning("MAdds not counted: %s", e)
    if data_loader is not None:
        report["top1_before"] = evaluate(model, data_loader, device)["top1"]
        report["top1_after"] = evaluate(deployed, data_loader, device)["top1"]
    # does the deployed state_dict load into the unmodified baseline architecture?
    try:
        plain = build_model(baseline_config(cfg))
        load_model_state_strict(plain, deployed.state_dict(), what="deployed model")
        report["loads_into_baseline"] = True
        report["baseline_params"] = _count(plain)
    except UserError as e:
        report["loads_into_baseline"] = False
        report["baseline_mismatch"] = str(e)
    return deployed, report


def save_deployed(cfg: DictConfig, model: nn.Module, val_loader, device: torch.device, run_dir: Path,
                  tolerance: float = 1e-4, max_batches: int = 2, decompose: str | bool = "auto") -> dict:
    """Write run_dir/deployed.pt (+ deploy.json); refuse to save when outputs drift beyond `tolerance`."""
    batches = []
    for i, (images, _) in enumerate(val_loader):
        if i >= max_batches:
            break
        batches.append(images)
    deployed, report = deploy_model(cfg, model, batches, device, tolerance, decompose=decompose)
    path = Path(run_dir) / "deployed.pt"
    (Path(run_dir) / "deploy.json").write_text(json.dumps(report, indent=2))
    if report["max_abs_logit_diff"] > tolerance:
        log.error("deployed model drifts by %.3g > %.3g; NOT saved", report["max_abs_logit_diff"], tolerance)
        report["saved"] = None
        return report
    save_atomic({"model": deployed.state_dict(), "config": OmegaConf.to_container(baseline_config(cfg)),
                 "report": report}, path)
    report["saved"] = str(path)
    log.info("deployed model: %s (max |dlogit| %.2e, params %d -> %d)", path, report["max_abs_logit_diff"],
             report["params_before"], report["params_after"])
    return report
