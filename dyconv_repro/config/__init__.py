"""Configuration: the schema of a composed config, its validation, and the one composition helper all tools use."""

from dyconv_repro.config.compose import apply_overrides, compose, groups_help
from dyconv_repro.config.validate import validate

__all__ = ["apply_overrides", "compose", "groups_help", "validate"]
