"""Checkpoints: atomic writes (temp file + rename) and full training state for exact resume.

`last.pt` is written with `keep_previous=True`: the checkpoint it replaces stays as `prev.pt` (a hard
link, so no copy), and `load_resumable` falls back to it when `last.pt` cannot be read.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from dyconv_repro.errors import UserError

log = logging.getLogger("dyconv")

PREVIOUS = "prev.pt"  # the checkpoint last.pt replaced


def temp_name(path: Path) -> Path:
    """The temp file an atomic write of `path` goes through (hidden, per process; see rundir.remove_temp_files)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def save_atomic(obj, path: Path, keep_previous: bool = False) -> None:
    """torch.save to a temp file in the same directory, then rename: a kill never leaves half a file, and a
    failed write (a full disk) removes its temp file. `keep_previous`: the file replaced stays as prev.pt."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:  # through a Python file: a full disk raises OSError(ENOSPC), not RuntimeError
            torch.save(obj, f)
        if keep_previous and path.is_file():
            _keep_as_previous(path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _keep_as_previous(path: Path) -> None:
    prev, tmp = path.with_name(PREVIOUS), temp_name(path.with_name(PREVIOUS))
    try:
        os.link(path, tmp)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # a hard link needs no data blocks, so this is the disk, not the link
            raise
        shutil.copy2(path, tmp)  # a filesystem without hard links
    os.replace(tmp, prev)


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
        raise UserError(f"cannot read checkpoint {path}: {_one_line(e)}") from None


_TRAINING_KEYS = ("model", "optimizer", "epoch", "global_step")


def load_training_state(path: Path) -> dict:
    """A checkpoint written by save_last (model, optimizer, progress); anything else is a UserError."""
    state = load_checkpoint(path)
    missing = [k for k in _TRAINING_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"checkpoint {path} is not a dyconv training checkpoint (no {', '.join(missing)})")
    return state


def load_resumable(last: Path) -> tuple[dict, Path]:
    """(state, the file it came from): `last`, or the previous checkpoint when `last` is unreadable.

    The unreadable file is renamed to <name>.corrupt (kept for inspection, and so that the next save does not
    turn it into prev.pt). Without a readable previous checkpoint the error says how to go on."""
    last = Path(last)
    try:
        return load_training_state(last), last
    except UserError as e:
        prev = last.with_name(PREVIOUS)
        if last.name == PREVIOUS or not prev.is_file():
            raise UserError(f"{e}; no previous checkpoint to fall back to: move it away and rerun to start this "
                            "run over in the same directory, or set trainer.resume=<another last.pt>") from None
        state = load_training_state(prev)
        os.replace(last, last.with_name(last.name + ".corrupt"))
        log.warning("%s; resuming from the previous checkpoint %s instead (epoch %d, step %d; the unreadable "
                    "file is kept as %s.corrupt)", e, prev, state["epoch"], state["global_step"], last.name)
        return state, prev


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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
