"""Checkpoints: atomic writes (temp file + rename) and full training state for exact resume."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from dyconv_repro.errors import UserError


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temp file in the same directory, then rename: a kill never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's generators (Python, NumPy, torch CPU and its current CUDA device: one GPU a process)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> list[str]:
    """Restore what `rng_state` saved; returns the generators it could not restore (e.g. CUDA on a CPU run)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    skipped = []
    cuda = state.get("cuda")
    if cuda is not None:
        if not torch.cuda.is_available():
            skipped.append("cuda (no GPU here)")
        elif isinstance(cuda, list):  # an older checkpoint: every device's state, one per visible GPU
            if len(cuda) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(cuda)
            else:
                skipped.append(f"cuda ({len(cuda)} devices saved, {torch.cuda.device_count()} here)")
        else:
            torch.cuda.set_rng_state(cuda)
    return skipped


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a corrupt file is user input
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def model_state_from(obj) -> dict:
    """The model state_dict inside one of our checkpoints, or a plain state_dict as is."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        return obj["state_dict"]
    if isinstance(obj, dict):
        return obj
    raise UserError("checkpoint holds neither a state_dict nor a dyconv checkpoint")


def load_model_state_strict(model: torch.nn.Module, state: dict, what: str = "checkpoint") -> None:
    """Load with strict key AND shape checks; a mismatch names the keys instead of a traceback wall."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shape:
        def fmt(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {fmt(unexpected)}")
        if shape:
            parts.append(f"{len(shape)} shape-mismatched: {fmt(shape)}")
        raise UserError(f"{what} does not fit this model (different architecture/operator?): " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
