"""The config is the record: schema validation (one line, exit 2), the policy resolved by Hydra and saved in the
run's config.yaml, the replaced layers in summary.json equal to what `dyconv-complexity --layers` prints, recipes
that extend one base, and one composition helper for every tool."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dyconv_repro.config import apply_overrides, compose, validate
from dyconv_repro.config_dir import config_dir
from dyconv_repro.errors import UserError

from .conftest import run_cli

CONFIGS = Path(config_dir())


def test_one_epoch_run_records_the_resolved_policy_and_the_replaced_layers(tmp_path):
    over = ["op=dynamicconv", "op.kwargs.num_kernels=2", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
            "recipe.batch_size=16", "recipe.temperature=null", "trainer.progress=false"]
    proc = run_cli(["dyconv-train", *over, f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path, check=True)
    (run_dir,) = [p.parent for p in (tmp_path / "runs").rglob("summary.json")]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    paper = yaml.safe_load((CONFIGS / "policy" / "dynamicconv.yaml").read_text())
    assert saved["policy"]["name"] == "dynamicconv"
    for key in ("roles", "kernel_sizes", "stages", "min_channels", "block_routing", "copy_weights"):
        assert saved["policy"][key] == paper[key], key  # the real placement, not `auto` + nulls

    summary = json.loads((run_dir / "summary.json").read_text())
    table = run_cli(["dyconv-complexity", *over[:2], "--layers"], cwd=tmp_path, check=True).stdout
    printed = [line.split()[0] for line in table.splitlines() if re.search(r"\s(dynamicconv)\s+yes$", line)]
    recorded = [layer["name"] for layer in summary["replaced_layers"]]
    assert recorded and recorded == printed
    assert {layer["role"] for layer in summary["replaced_layers"]} <= set(paper["roles"])
    digest = re.search(r"replaced-layers digest (\w+)", table).group(1)
    assert summary["replaced_layers_digest"] == digest
    assert "[surgery]" in proc.stdout


@pytest.mark.parametrize("overrides, message", [
    (["recipe.lr=-1"], "recipe.lr must be > 0, got -1"),
    (["recipe.batch_size=abc"], "recipe.batch_size: Value 'abc' of type 'str' could not be converted to Integer"),
    (["+trainer.epoch=3"], "unknown key trainer.epoch (did you mean trainer.epochs?)"),
    (["op=dynamicconv", "op.kwargs.num_kernels=0"], "dynamicconv needs num_kernels >= 1"),
    (["op=dynamicconv", "recipe.temperature={init:30,final:1,epochs:1,per:batch}"],
     "recipe.temperature.per must be one of step, epoch, got 'batch'"),
    (["model=nonexistent"], "Could not find 'model/nonexistent'"),  # Hydra's own composition error
], ids=["negative-lr", "string-batch", "unknown-trainer-key", "op-kwarg-range", "nested-choice", "hydra-group"])
def test_bad_values_are_one_line_and_exit_2(tmp_path, overrides, message):
    proc = run_cli(["dyconv-train", *overrides, f"output_dir={tmp_path / 'runs'}"], cwd=tmp_path)
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "runs").rglob("summary.json"))  # refused before a run directory exists


def test_schema_fills_and_checks_in_process():
    cfg = compose(["recipe=imagenet_dy"])
    assert cfg.recipe.warmup_prefix is False and cfg.recipe.momentum == 0.9  # from recipe/base.yaml
    with pytest.raises(UserError, match=r"recipe\.scheduler=multistep needs recipe\.decay_milestones"):
        compose(["recipe.scheduler=multistep"])
    with pytest.raises(UserError, match=r"unknown key foo; valid keys: data, model"):
        compose(["+foo=1"])
    with pytest.raises(UserError, match=r"trainer\.amp must be one of false, null, bf16, fp16, got 'fp32'"):
        compose(["trainer.amp=fp32"])
    broken = OmegaConf.create(OmegaConf.to_container(compose([]), resolve=False))
    del broken.recipe["lr"]
    with pytest.raises(UserError, match=r"recipe\.lr is missing"):
        validate(broken)


def test_every_recipe_extends_the_base_and_opens_with_its_source():
    base = yaml.safe_load((CONFIGS / "recipe" / "base.yaml").read_text())
    for f in sorted((CONFIGS / "recipe").glob("*.yaml")):
        if f.stem == "base":
            continue
        text = f.read_text()
        assert text.startswith("#"), f"{f.name}: open with a comment that names the recipe's source"
        data = yaml.safe_load(text)
        assert data["defaults"] == ["base", "_self_"], f.name
        same = [k for k, v in data.items() if k not in ("defaults", "name") and base.get(k) == v]
        assert not same, f"{f.name} repeats the base value of {same}"
        assert not [k for k in data if k not in base and k != "defaults"], f"{f.name}: keys outside the base"


def test_each_op_config_selects_its_policy_and_overrides_still_win():
    assert compose(["op=condconv"]).policy.name == "condconv"
    assert compose(["op=condconv", "policy=all"]).policy.name == "all"
    assert compose(["experiment=condconv/t1_effnet_b0_cc8"]).policy.name == "condconv_effnet"
    assert compose([]).policy.name == "none"


def test_apply_overrides_uses_hydra_grammar_and_refuses_group_changes():
    cfg = compose([])
    out = apply_overrides(cfg, ["recipe.decay_milestones=[2,4]", "data.root=/x"])
    assert list(out.recipe.decay_milestones) == [2, 4] and out.data.root == "/x"
    with pytest.raises(UserError, match="groups are fixed"):
        apply_overrides(cfg, ["op=dynamicconv"])
    with pytest.raises(UserError, match=r"has no key recipe\.lrr"):
        apply_overrides(cfg, ["recipe.lrr=1"])


@pytest.mark.parametrize("tool", [["dyconv-eval"], ["dyconv-deploy"], ["dyconv-export"], ["dyconv-complexity"],
                                  ["dyconv-bench", "model"]])
def test_tools_help_lists_the_config_groups(tmp_path, tool):
    proc = run_cli([*tool, "--help"], cwd=tmp_path, check=True)
    for group in ("data", "model", "op", "policy", "recipe", "trainer", "logger", "experiment"):
        assert re.search(rf"^\s+{group}\s", proc.stdout, re.M), (group, proc.stdout[-1500:])
