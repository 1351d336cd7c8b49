"""`dyconv-list [ops|backbones|datasets|experiments|policies|recipes|all]`: what can be composed."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from dyconv_repro.config_dir import config_dir
from dyconv_repro.models.policy import paper_policy_name


def _group_files(group: str) -> list[Path]:
    return sorted((Path(config_dir()) / group).rglob("*.yaml"))


def _ops() -> list[str]:
    from dyconv_repro.ops import OPS

    lines = []
    cfg_dir = Path(config_dir()) / "op"
    for name in OPS.names():
        f = cfg_dir / f"{name}.yaml"
        kwargs = OmegaConf.to_container(OmegaConf.load(f)).get("kwargs", {}) if f.is_file() else {}
        opts = ", ".join(f"{k}={v}" for k, v in (kwargs or {}).items())
        lines.append(f"  {name:<12} {OPS.help(name)}" + (f"\n  {'':<12}   options: {opts}" if opts else ""))
        described = _description(OPS.get(name))
        if described:
            lines.append(f"  {'':<12}   {described}")
    return lines


def _description(cls) -> str:
    """Its paper placement (the policy its config selects), restrictions and optional capabilities."""
    parts = [f"placement: policy/{paper_policy_name(getattr(cls, 'op_name', '?'))}"]
    if getattr(cls, "depthwise_only", False):
        parts.append("depthwise convs only")
    caps = cls.capabilities() if hasattr(cls, "capabilities") else []
    if caps:
        parts.append("capabilities: " + ", ".join(caps))
    return "; ".join(parts)


def _registry_lines(registry) -> list[str]:
    return [f"  {n:<26} {registry.help(n)}" for n in registry.names()]


def _configs(group: str) -> list[str]:
    base = Path(config_dir()) / group
    return [f"  {p.relative_to(base).with_suffix('')}" for p in _group_files(group)]


def sections() -> dict:
    def backbones():
        from dyconv_repro.models import BACKBONES

        return _registry_lines(BACKBONES) + ["  (plus model=timm model.name=<any timm model>, "
                                             "model=torchvision model.name=<any torchvision classifier>)"]

    def datasets():
        from dyconv_repro.data import DATASETS

        return _registry_lines(DATASETS)

    return {"ops": _ops, "backbones": backbones, "datasets": datasets,
            "experiments": lambda: _configs("experiment"), "policies": lambda: _configs("policy"),
            "recipes": lambda: _configs("recipe")}


def main(argv: list[str] | None = None) -> None:
    secs = sections()
    parser = argparse.ArgumentParser(prog="dyconv-list", description=__doc__)
    parser.add_argument("what", nargs="?", default="all", choices=[*secs, "all"])
    parser.add_argument("--write", nargs="?", const="results/tables/recipes.md", default=None, metavar="PATH",
                        help="with `recipes`: write the page of every row's composed recipe and the source of each "
                             "value (default results/tables/recipes.md)")
    args = parser.parse_args(argv)
    if args.write:
        if args.what != "recipes":
            parser.error("--write goes with `dyconv-list recipes`")
        from dyconv_repro.results.recipes import write_page

        print(f"wrote {write_page(args.write)}")
        return
    try:
        _print(secs, args.what)
    except BrokenPipeError:  # `dyconv-list | head`
        pass


def _print(secs: dict, what: str) -> None:
    for name, fn in secs.items():
        if what in (name, "all"):
            lines = fn()
            entries = [ln for ln in lines if ln[2:3] not in (" ", "(")]  # not continuation / note lines
            print(f"{name} ({len(entries)}):")
            print("\n".join(lines) if lines else "  (none)")


if __name__ == "__main__":
    main()
