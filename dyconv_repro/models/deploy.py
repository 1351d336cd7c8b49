"""Deployment: re-parameterize every operator that can, verify outputs, save a plain model."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from dyconv_repro.engine.checkpoint import save_atomic
from dyconv_repro.errors import UserError
from dyconv_repro.ops import walkers

log = logging.getLogger("dyconv")

# Which structured layers pay for their SumPool is a property of the machine, not of the math: decompose a
# layer (decompose="auto") only when the MAdds it saves per element its sum-pool reads (`decompose_gain()`)
# reach this. Measured on the project's 2-core CPU (torch 2.14.1, batch 1 and 32, NCHW and channels_last,
# ResNet-20 / MobileNetV2 shapes): gains <= 80 lost (1.1-3x slower), ~100 tied, >= 150 won (0.5-0.95x);
# depthwise layers gain <= 5. See the `[decomposed]` rows of results/benchmarks/cpu_*.md.
DECOMPOSE_MIN_GAIN = 100.0
DECOMPOSE_MODES = ("auto", "all", "none")


def decompose_pays(layer: nn.Module) -> bool:
    """The CPU rule of decompose="auto": the layer's decomposition saves enough MAdds per pooled element."""
    return layer.decompose_gain() >= DECOMPOSE_MIN_GAIN


def decompose_mode(value) -> str:
    """auto | all | none from a config value (true = all, false = none)."""
    text = str(value).strip().lower()
    mode = {"true": "all", "1": "all", "yes": "all", "false": "none", "0": "none", "no": "none"}.get(text, text)
    if mode not in DECOMPOSE_MODES:
        raise UserError(f"decompose must be one of {', '.join(DECOMPOSE_MODES)} (or true/false), got {value!r}")
    return mode


@torch.no_grad()
def _logits(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in batches])


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def baseline_config(cfg: DictConfig) -> DictConfig:
    """The same backbone with plain convs (op=conv, nothing replaced, no init)."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(base):
        base.op = {"name": "conv", "kwargs": {}}
        base.policy = {"name": "none"}
        base.model.init_from = None
        base.model.pretrained = False
    return base


def deploy_transform(model: nn.Module, decompose: str | bool = "auto") -> nn.Module:
    """A deep copy in eval mode with structured layers decomposed (SumPool + small conv) -- every one ("all"),
    those where it pays on CPU ("auto", `decompose_pays`) or none -- and every other re-parameterizable operator
    (the structured layers left dense included) turned into its plain conv."""
    mode = decompose_mode(decompose)
    model = copy.deepcopy(model).eval()
    if mode != "none":
        model = walkers.decompose_model(model, select=decompose_pays if mode == "auto" else None)
    return walkers.reparameterize_model(model)


def decomposition_report(model: nn.Module) -> dict:
    """Per structured layer: its gain and whether decompose="auto" decomposes it (both forms are exact)."""
    layers = walkers.structured_layers(model)
    return {"structured_layers": len(layers),
            "decomposed_by_auto": [name for name, m in layers if decompose_pays(m)],
            "kept_dense_by_auto": [name for name, m in layers if not decompose_pays(m)],
            "rule": f"decompose_gain() >= {DECOMPOSE_MIN_GAIN:g} (measured on CPU)"}


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
        from dyconv_repro.analysis.complexity import count_madds

        size = int(cfg.data.image_size)
        report.update(madds_before=count_madds(model, size), madds_after=count_madds(deployed, size))
    except Exception as e:  # noqa: BLE001 - a report field, not a reason to fail
        log.warning("MAdds not counted: %s", e)
    if data_loader is not None:
        from dyconv_repro.engine.evaluate import evaluate

        report["top1_before"] = evaluate(model, data_loader, device)["top1"]
        report["top1_after"] = evaluate(deployed, data_loader, device)["top1"]
    # does the deployed state_dict load into the unmodified baseline architecture?
    try:
        from dyconv_repro.engine.checkpoint import load_model_state_strict
        from dyconv_repro.models.build import build_model

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
    import json

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
