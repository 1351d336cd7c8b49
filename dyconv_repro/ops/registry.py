"""The operator registry (kept apart from ops/__init__ so operator modules import it without cycles)."""

from dyconv_repro.registry import Registry

OPS = Registry("operator")
