"""A finished (or running) run's model, rebuilt from the config it recorded: what `dyconv-eval`, `dyconv-deploy`
and `dyconv-export` start from."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from dyconv_repro.config import apply_overrides
from dyconv_repro.config_dir import config_dir
from dyconv_repro.engine.checkpoint import load_checkpoint, load_model_state_strict, model_state_from
from dyconv_repro.errors import UserError
from dyconv_repro.models.build import build_model
from dyconv_repro.models.policy import load_policy


def checkpoint_path(ckpt: str) -> Path:
    """A checkpoint file, or a run directory (its checkpoints/best.pt, else last.pt)."""
    path = Path(ckpt)
    if path.is_dir():
        for cand in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt"):
            if cand.is_file():
                return cand
        raise UserError(f"{path} holds no checkpoints/best.pt or last.pt")
    if not path.is_file():
        raise UserError(f"ckpt={ckpt}: no such file or run directory")
    return path


def upgrade_saved_config(cfg: DictConfig) -> DictConfig:
    """A config saved before the schema: `policy: auto` resolved to the policy it stood for, and the recipe /
    trainer keys added since then taken from configs/recipe/base.yaml and configs/trainer/default.yaml."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    policy = cfg.get("policy")
    if policy is not None and policy.get("name") in (None, "auto"):
        cfg.policy = dataclasses.asdict(load_policy(policy, str(cfg.op.name)))
    for group, file in (("recipe", "recipe/base.yaml"), ("trainer", "trainer/default.yaml")):
        defaults = yaml.safe_load((Path(config_dir()) / file).read_text()) or {}
        for key, value in defaults.items():
            if key not in cfg[group] and key != "defaults" and value != "???":
                cfg[group][key] = value
    return cfg


def load_run_config(ckpt_path: Path, state: dict) -> DictConfig:
    """The config a checkpoint was trained with (stored in it, or the run's config.yaml)."""
    if isinstance(state, dict) and state.get("config"):
        return upgrade_saved_config(OmegaConf.create(state["config"]))
    for cand in (ckpt_path.parent / "config.yaml", ckpt_path.parent.parent / "config.yaml"):
        if cand.is_file():
            return upgrade_saved_config(OmegaConf.load(cand))
    raise UserError(f"{ckpt_path} carries no config and no config.yaml was found next to it")


def load_run(ckpt: str, overrides: list[str] = ()) -> tuple[DictConfig, nn.Module, dict, Path]:
    """(validated config with `overrides`, model with the checkpoint's weights, checkpoint state, its path).

    The weights come from the checkpoint only: `model.init_from` / `model.pretrained` are switched off."""
    path = checkpoint_path(ckpt)
    state = load_checkpoint(path)
    cfg = apply_overrides(load_run_config(path, state), [*overrides, "model.init_from=null", "model.pretrained=false"])
    model = build_model(cfg)
    load_model_state_strict(model, model_state_from(state), what=f"checkpoint {path}")
    return cfg, model, state, path
