"""dyconv-repro: reproduce, compare and extend dynamic and re-parameterized convolutions."""

__version__ = "0.1.0"
