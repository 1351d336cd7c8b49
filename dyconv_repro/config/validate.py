"""`validate(cfg)`: a composed config checked against the schema (types, unknown keys, ranges, consistency).

Every entry point calls it right after composing (config/compose.py, the `dyconv-train` task, each pipeline
stage), so bad input is one `UserError` line (exit 2) instead of a failure deep inside a run. The checked config
is returned as a plain DictConfig (interpolations kept) so the rest of the code treats it as before.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException, ValidationError

from dyconv_repro.config.schema import TrainConfig
from dyconv_repro.errors import UserError

_CHECKS = {"gt": (lambda v, b: v > b, ">"), "ge": (lambda v, b: v >= b, ">="),
           "lt": (lambda v, b: v < b, "<"), "le": (lambda v, b: v <= b, "<=")}


def _dataclass_of(tp) -> type | None:
    """The dataclass inside an annotation such as `RecipeConfig`, `X | None` or `list[X]`."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_of(arg)
        if found is not None:
            return found
    return None


def _keys_of(schema: type, path: list[str]) -> list[str]:
    for name in path:
        hints = typing.get_type_hints(schema)
        sub = _dataclass_of(hints.get(name)) if name in hints else None
        if sub is None:
            return []
        schema = sub
    return [f.name for f in dataclasses.fields(schema)]


def _one_line(e: OmegaConfBaseException) -> str:
    full_key = getattr(e, "full_key", None) or "config"
    msg = str(getattr(e, "msg", None) or e).splitlines()[0]
    if isinstance(e, MissingMandatoryValue):
        return f"{full_key} is missing: set it (recipes extend configs/recipe/base.yaml, which marks it ???)"
    if isinstance(e, ConfigKeyError):
        parent, _, name = str(full_key).rpartition(".")
        valid = _keys_of(TrainConfig, parent.split(".") if parent else [])
        close = difflib.get_close_matches(name, valid, 1)
        hint = f" (did you mean {parent + '.' if parent else ''}{close[0]}?)" if close else ""
        return f"unknown key {full_key}{hint}; valid keys{' of ' + parent if parent else ''}: {', '.join(valid)}"
    if isinstance(e, ValidationError):
        return f"{full_key}: {msg}"
    return f"config error at {full_key}: {msg}"


def _names(choices) -> str:
    """Choices as one writes them on the command line (false / null, not False / None)."""
    return ", ".join({True: "true", False: "false", None: "null"}.get(c, str(c)) if not isinstance(c, str) else c
                     for c in choices)


def _check_ranges(value, schema: type, prefix: str) -> None:
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        v = value.get(f.name) if isinstance(value, dict) else None
        full = f"{prefix}{f.name}"
        if v is None:
            continue
        sub = _dataclass_of(hints[f.name])
        if sub is not None and isinstance(v, dict):
            _check_ranges(v, sub, full + ".")
        elif sub is not None and isinstance(v, list):
            for i, item in enumerate(v):
                _check_ranges(item, sub, f"{full}[{i}].")
        choices = f.metadata.get("choices")
        if choices is not None and not any(v is c or (type(v) is type(c) and v == c) for c in choices):
            raise UserError(f"{full} must be one of {_names(choices)}, got {v!r}")
        for name, (ok, sign) in _CHECKS.items():
            bound = f.metadata.get(name)
            if bound is not None and isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v, bound):
                raise UserError(f"{full} must be {sign} {bound:g}, got {v!r}")


def _check_consistency(c: dict) -> None:
    """Rules between keys of different groups."""
    recipe, model = c["recipe"], c["model"]
    if recipe["batch_size"] % recipe["accumulate_steps"]:
        raise UserError(f"recipe.batch_size={recipe['batch_size']} is not divisible by recipe.accumulate_steps="
                        f"{recipe['accumulate_steps']} (the batch is split into that many micro-batches)")
    if recipe["scheduler"] == "multistep" and not recipe["decay_milestones"]:
        raise UserError("recipe.scheduler=multistep needs recipe.decay_milestones (the epochs at which lr x "
                        "decay_rate)")
    if recipe["refocus"] is not None:
        random_basis = c["op"]["kwargs"].get("basis") == "random"
        if c["op"]["name"] != "refconv":
            raise UserError(f"recipe.refocus needs op=refconv, got op={c['op']['name']}")
        if not (model["init_from"] or model["pretrained"] or random_basis or c.get("pipeline")):
            raise UserError("recipe.refocus needs a trained baseline to refocus: set model.init_from=<checkpoint> "
                            "or model.pretrained=true (or op.kwargs.basis=random for the random-basis ablation)")


def validate(cfg) -> DictConfig:
    """`cfg` merged onto the schema: UserError (one line) on a wrong type, an unknown or missing key, a value out
    of range or an inconsistent combination; otherwise the same config as a plain DictConfig."""
    plain = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    plain.pop("hydra", None)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), plain)
        resolved = OmegaConf.to_container(merged, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise UserError(_one_line(e)) from None
    _check_ranges(resolved, TrainConfig, "")
    _check_consistency(resolved)
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=False))

