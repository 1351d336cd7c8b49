"""Replacement policies: which convs a paper turns into its operator.

A policy (configs/policy/<name>.yaml) selects layers by role (see roles.py), kernel size, stage and
width, so one small file states a paper's placement for every backbone. Under Hydra each operator's
config chooses its paper policy in its defaults list (configs/op/<op>.yaml: `override
/policy@_global_.policy: <name>`), so a run's config.yaml holds the placement it used. From Python,
`load_policy("auto", op)` reads that same choice.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError
from dyconv_repro.models.roles import CONV_ROLES, ROLES, LayerReport

KEYS = ("name", "roles", "kernel_sizes", "stages", "min_channels", "block_routing", "copy_weights",
        "role_kwargs", "exclude", "allow_empty")


@dataclass
class Policy:
    """Selection rules. `roles` may contain "all" (= every conv role; the classifier only if listed).

    role_kwargs: per-role operator kwargs on top of op.kwargs (e.g. Structured's c/n per role);
    exclude: regexes on module names that are never replaced.
    """

    name: str = "none"
    roles: tuple[str, ...] = ()
    kernel_sizes: tuple[int, ...] | None = None
    stages: tuple[int, ...] | None = None
    min_channels: int = 0
    block_routing: bool = False
    copy_weights: bool = False
    role_kwargs: dict = field(default_factory=dict)
    exclude: tuple[str, ...] = ()
    allow_empty: bool = False  # a policy that selects no layer of this model is an error unless this is set

    def __post_init__(self):
        roles = [str(r) for r in (self.roles or ())]
        bad = [r for r in roles if r not in ROLES and r != "all"]
        if bad:
            raise UserError(f"policy {self.name!r}: unknown role(s) {bad}; valid roles: {', '.join(ROLES)}, all")
        if "all" in roles:
            roles = [r for r in roles if r != "all"] + [r for r in CONV_ROLES if r not in roles]
        self.roles = tuple(roles)
        self.kernel_sizes = None if self.kernel_sizes is None else tuple(int(k) for k in self.kernel_sizes)
        self.stages = None if self.stages is None else tuple(int(s) for s in self.stages)
        self.min_channels = int(self.min_channels or 0)
        self.block_routing, self.copy_weights = bool(self.block_routing), bool(self.copy_weights)
        self.allow_empty = bool(self.allow_empty)
        self.role_kwargs = {str(k): dict(v or {}) for k, v in dict(self.role_kwargs or {}).items()}
        bad = [r for r in self.role_kwargs if r not in ROLES]
        if bad:
            raise UserError(f"policy {self.name!r}: role_kwargs for unknown role(s) {bad}; valid: {', '.join(ROLES)}")
        self.exclude = tuple(str(p) for p in (self.exclude or ()))

    def selects(self, layer: LayerReport) -> bool:
        """Whether this policy replaces `layer`."""
        if layer.role not in self.roles:
            return False
        if any(re.search(p, layer.name) for p in self.exclude):
            return False
        if layer.role == "classifier":
            return True
        if self.kernel_sizes is not None and layer.kernel[0] not in self.kernel_sizes:
            return False
        if self.stages is not None and layer.stage not in self.stages:
            return False
        channels = layer.out_channels if layer.role == "stem" else layer.in_channels
        return channels >= self.min_channels

    def kwargs_for(self, role: str, op_kwargs: Mapping) -> dict:
        """op.kwargs overlaid with this policy's kwargs for `role`."""
        return {**dict(op_kwargs or {}), **self.role_kwargs.get(role, {})}


def policy_names() -> list[str]:
    return sorted(p.stem for p in (Path(config_dir()) / "policy").glob("*.yaml"))


def paper_policy_name(op_name: str) -> str:
    """The policy that configs/op/<op>.yaml selects (what `dyconv-train op=<op>` uses); `none` when the op
    has no config file or its config selects none."""
    path = Path(config_dir()) / "op" / f"{op_name}.yaml"
    if not path.is_file():
        return "none"
    for entry in (yaml.safe_load(path.read_text()) or {}).get("defaults") or []:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if str(key).replace("override ", "").strip().split("@")[0].lstrip("/") == "policy":
                    return str(value)
    return "none"


def _to_dict(policy) -> dict:
    if policy is None:
        return {"name": "auto"}
    if isinstance(policy, str):
        return {"name": policy}
    try:  # DictConfig
        from omegaconf import DictConfig, OmegaConf

        if isinstance(policy, DictConfig):
            return dict(OmegaConf.to_container(policy, resolve=True))
    except ImportError:  # pragma: no cover
        pass
    return dict(policy)


def load_policy(policy, op_name: str = "conv") -> Policy:
    """Policy from a Policy, a name, or a (Dict)Config; keys given next to `name` override the file.

    A name without other keys reads configs/policy/<name>.yaml; `auto` (Python shorthand) reads the policy
    the op's config selects, with the keys given as null taken from that file.
    """
    if isinstance(policy, Policy):
        return policy
    data = _to_dict(policy)
    name = str(data.get("name") or "auto")
    unknown = [k for k in data if k not in KEYS]
    if unknown:
        raise UserError(f"policy: unknown key(s) {unknown}; valid keys: {', '.join(KEYS)}")
    overrides = {k: v for k, v in data.items() if k != "name"}
    if name == "auto":  # null = take it from the op's paper policy
        name = paper_policy_name(op_name)
        overrides = {k: v for k, v in overrides.items() if v is not None}
    path = Path(config_dir()) / "policy" / f"{name}.yaml"
    if path.is_file():
        base = yaml.safe_load(path.read_text()) or {}
        base = {k: v for k, v in base.items() if k != "name"}
    elif "roles" in overrides:  # a fully inline policy
        base = {}
    else:
        raise UserError(f"unknown policy {name!r} (no {path}). Valid policies: {', '.join(policy_names())}, auto")
    return Policy(name=name, **{**base, **overrides})
