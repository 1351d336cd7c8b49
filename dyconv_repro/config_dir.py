"""Where the Hydra configs are, for an editable checkout and for an installed wheel alike."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """Absolute path of the `configs/` tree (shipped as `dyconv_repro/configs` in a wheel)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    try:  # an editable install maps dyconv_repro.configs -> <repo>/configs
        from importlib.resources import files

        path = Path(str(files("dyconv_repro.configs")))
        if (path / "train.yaml").is_file():
            return str(path)
    except Exception:  # noqa: BLE001 - fall through to a clear error
        pass
    raise FileNotFoundError(f"dyconv-repro configs not found next to {here}; reinstall the package")
