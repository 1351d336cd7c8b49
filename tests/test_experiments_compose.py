"""Every configs/experiment/<paper>/<row>.yaml composes through Hydra into a complete config.

Composition only (no model is built; every row composes in the slow suite, one row per table and a
file-existence check of every row's group overrides in the fast one): the test that instantiates every row needs the trainer and
models and lives with them. This one catches a missing model/op/recipe/policy config, a typo in a
group override, and a recipe that lacks a key of the schema (dyconv_repro/config/schema.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from dyconv_repro.config import validate
from dyconv_repro.config.schema import RecipeConfig
from dyconv_repro.config_dir import config_dir
from dyconv_repro.ops import OPS

CONFIGS = Path(config_dir())
EXPERIMENTS = sorted(p.relative_to(CONFIGS / "experiment").with_suffix("").as_posix()
                     for p in (CONFIGS / "experiment").rglob("*.yaml"))
RECIPE_KEYS = {f.name for f in dataclasses.fields(RecipeConfig)}


@pytest.fixture(scope="module")
def composer():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield lambda overrides: compose("train", overrides=overrides)


def test_there_are_experiments():
    papers = {e.split("/")[0] for e in EXPERIMENTS}
    assert papers == {"condconv", "dynamicconv", "dynet", "weightnet", "mixconv", "structured", "refconv",
                      "odconv", "dcd", "kernelwarehouse"}


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONFIGS / "recipe").glob("*.yaml") if p.stem != "base"))
def test_every_recipe_fills_the_schema(recipe, composer):
    extra = ["op=refconv", "model.pretrained=true"] if recipe == "refconv_refocus" else []  # it needs both
    cfg = validate(composer([f"recipe={recipe}", *extra]))  # every RecipeConfig key present, typed and in range
    assert set(cfg.recipe) == RECIPE_KEYS


def _first_row_per_table() -> list[str]:
    seen, out = set(), []
    for exp in EXPERIMENTS:
        key = (exp.split("/")[0], exp.split("/")[1].split("_")[0])
        if key not in seen:
            seen.add(key)
            out.append(exp)
    return out


def test_every_group_override_names_an_existing_config():
    """Cheap, for every row: each `override /<group>: <name>` has a configs/<group>/<name>.yaml."""
    missing = []
    for exp in EXPERIMENTS:
        cfg = yaml.safe_load((CONFIGS / "experiment" / f"{exp}.yaml").read_text())
        for entry in cfg["defaults"]:
            for key, name in entry.items():
                group = key.removeprefix("override ").removeprefix("/").split("@")[0]  # `/group@package: name` too
                if not (CONFIGS / group / f"{name}.yaml").is_file():
                    missing.append(f"{exp}: configs/{group}/{name}.yaml")
    assert not missing, "missing configs:\n" + "\n".join(missing)


def test_one_row_per_table_composes(composer):
    _compose_all(composer, _first_row_per_table())


@pytest.mark.slow
def test_every_experiment_composes(composer):
    _compose_all(composer, EXPERIMENTS)


def _compose_all(composer, experiments):
    failures = []
    for exp in experiments:
        try:
            cfg = composer([f"experiment={exp}"])
            c = OmegaConf.to_container(cfg, resolve=True)
            assert c["run_name"] == exp, f"run_name {c['run_name']!r} != {exp!r}"
            for group in ("data", "model", "op", "policy", "recipe", "trainer"):
                assert group in c and c[group], f"group {group} missing"
            assert c["model"]["num_classes"] == c["data"]["num_classes"]
            assert RECIPE_KEYS <= set(c["recipe"]), f"recipe lacks {sorted(RECIPE_KEYS - set(c['recipe']))}"
            assert c["trainer"]["epochs"] == c["recipe"]["epochs"]
            text = (CONFIGS / "experiment" / f"{exp}.yaml").read_text().splitlines()
            assert text[0] == "# @package _global_" and text[1].startswith("# paper:")
            if "set_temperature" not in OPS.get(c["op"]["name"]).capabilities():
                assert not c["recipe"]["temperature"], "a temperature schedule without an op that has one"
            if c["op"]["name"] != "structured":
                assert not c["recipe"]["structural_reg"], "structural_reg without structured layers"
            if c["recipe"]["refocus"]:
                assert c["op"]["name"] == "refconv"
            for stage in c.get("pipeline") or []:  # stage overrides must compose too
                composer([f"experiment={exp}", *stage.get("overrides", [])])
        except Exception as e:  # noqa: BLE001 - collect every broken row, report them together
            failures.append(f"{exp}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    assert not failures, f"{len(failures)}/{len(experiments)} experiments do not compose:\n" + "\n".join(failures)
