"""The backbone registry (apart from models/__init__ so builder modules import it without cycles)."""

from dyconv_repro.registry import Registry

BACKBONES = Registry("backbone")
