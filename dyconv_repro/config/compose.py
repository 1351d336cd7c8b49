"""One way to turn Hydra overrides into a checked config, for every entry point.

- `compose(overrides)`: configs/train.yaml + overrides, exactly as `dyconv-train` composes it, then `validate`.
- `apply_overrides(cfg, overrides)`: a saved run config (config.yaml / a checkpoint's) + `key=value` overrides,
  parsed by Hydra's own override grammar (lists, quoting, `+key=`, `~key`); group choices (`op=...`) are refused
  there because a run's config is already composed.
- `groups_help()`: the config groups and their options, for each tool's `--help`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dyconv_repro.config.schema import GROUPS
from dyconv_repro.config.validate import validate
from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError


def _raw_compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if GlobalHydra.instance().is_initialized():  # inside a Hydra app (e.g. a pipeline stage)
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise UserError(" ".join(str(e).split()) or type(e).__name__) from None


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The validated config `dyconv-train <overrides>` would run."""
    return validate(_raw_compose(list(overrides), config_name))


def apply_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """A saved run config with Hydra-syntax `key=value` overrides, validated."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise UserError(" ".join(str(e).split())) from None
    for o in parsed:
        key = o.key_or_group
        if key in GROUPS or key.startswith("hydra") or key == "experiment":
            raise UserError(f"{o.input_line}: a saved run's groups are fixed; override its keys instead "
                            f"(e.g. {key}.<key>=...)")
        if o.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or leaf not in node:
                raise UserError(f"{o.input_line}: no key {key} to delete")
            del node[leaf]
            continue
        if not o.is_add() and OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            raise UserError(f"{o.input_line}: the run's config has no key {key} (use +{key}=... to add one)")
        OmegaConf.update(cfg, key, o.value(), merge=False, force_add=True)
    return validate(cfg)


def group_options() -> dict[str, list[str]]:
    """{group: [option, ...]} from configs/ (what `dyconv-train --help` lists too)."""
    root = Path(config_dir())
    out = {}
    for group in (*GROUPS, "experiment"):
        files = sorted((root / group).rglob("*.yaml"))
        names = [str(f.relative_to(root / group).with_suffix("")) for f in files]
        out[group] = [n for n in names if n != "base"]
    return out


def groups_help(tool: str, usage: str) -> str:
    """`--help` text: the usage line, then each config group with its options, like Hydra's app help."""
    lines = [f"usage: {usage}", "", "Overrides use Hydra's syntax (key=value, +key=value, list=[a,b]).",
             "Config groups (configs/<group>/<option>.yaml):"]
    for group, names in group_options().items():
        shown = names if group != "experiment" else sorted({n.split("/")[0] + "/*" for n in names})
        lines.append(f"  {group:<10} {', '.join(shown)}")
    lines.append(f"Schema (types, ranges): dyconv_repro/config/schema.py; `{tool}` checks every value first.")
    return "\n".join(lines)
