"""The dataset registry (apart from data/__init__ so dataset modules import it without cycles)."""

from dyconv_repro.registry import Registry

DATASETS = Registry("dataset")
