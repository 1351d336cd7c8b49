"""Deployment transforms: decompose / re-parameterize every operator that can (pure model -> model functions;
verifying and saving a deployed run is pipeline/deploy.py)."""

from __future__ import annotations

import copy
import logging

from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

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


def baseline_config(cfg: DictConfig) -> DictConfig:
    """The same backbone with plain convs (op=conv, nothing replaced, no init)."""
    base = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with open_dict(base):
        base.op = {"name": "conv", "kwargs": {}}
        base.policy = {"name": "none", "roles": []}
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
