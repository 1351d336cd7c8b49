"""`dyconv-eval ckpt=PATH [split=val] [key=value ...]`: evaluate a checkpoint, print and save top-1/top-5.

The model is rebuilt from the config stored in the checkpoint (or the run's config.yaml);
`key=value` overrides change it, e.g. `data.root=/data/imagenet trainer.device=cuda`.
Results go to <ckpt>.eval.json next to the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dyconv_repro.cli.common import parse_overrides, user_errors_exit
from dyconv_repro.errors import UserError


def load_run_config(ckpt_path: Path, state: dict):
    if isinstance(state, dict) and state.get("config"):
        return OmegaConf.create(state["config"])
    for cand in (ckpt_path.parent / "config.yaml", ckpt_path.parent.parent / "config.yaml"):
        if cand.is_file():
            return OmegaConf.load(cand)
    raise UserError(f"{ckpt_path} carries no config and no config.yaml was found next to it")


def checkpoint_path(value) -> Path:
    """A checkpoint file as given, or for a run directory its checkpoints/best.pt (else last.pt)."""
    path = Path(value)
    if path.is_dir():
        for cand in (path / "checkpoints" / "best.pt", path / "checkpoints" / "last.pt", path / "best.pt",
                     path / "last.pt"):
            if cand.is_file():
                return cand
        raise UserError(f"{path} is a directory without checkpoints/best.pt or checkpoints/last.pt")
    return path


def load_trained_model(path: Path, overrides: dict):
    """(model, cfg, state): the model rebuilt from the checkpoint's config (+ `key=value` overrides, no
    pretrained / init_from weights) with the checkpoint's weights loaded strictly."""
    from dyconv_repro.engine.checkpoint import load_checkpoint, load_model_state_strict, model_state_from
    from dyconv_repro.models.build import build_model

    state = load_checkpoint(path)
    cfg = load_run_config(path, state)
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    OmegaConf.update(cfg, "model.init_from", None, force_add=True)
    OmegaConf.update(cfg, "model.pretrained", False, force_add=True)
    model = build_model(cfg)
    load_model_state_strict(model, model_state_from(state), what=f"checkpoint {path}")
    return model, cfg, state


@user_errors_exit
def evaluate_checkpoint(argv: list[str]) -> dict:
    import torch

    from dyconv_repro.data import build_dataset
    from dyconv_repro.engine.evaluate import evaluate
    from dyconv_repro.engine.trainer import resolve_device

    kv, rest = parse_overrides(argv)
    if rest:
        raise UserError(f"unexpected arguments {rest}; usage: dyconv-eval ckpt=PATH [split=val|train] [key=value ...]")
    if "ckpt" not in kv:
        raise UserError("usage: dyconv-eval ckpt=PATH [split=val|train] [key=value ...]")
    path = Path(kv.pop("ckpt"))
    split = kv.pop("split", "val")
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    model, cfg, _ = load_trained_model(path, kv)
    device = resolve_device(str(cfg.trainer.get("device", "auto")))
    model.to(device)
    dataset = build_dataset(cfg.data, split, cfg.recipe)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg.recipe.batch_size), shuffle=False,
                                         num_workers=int(cfg.data.get("num_workers", 0)))
    result = evaluate(model, loader, device)
    result.update(ckpt=str(path), split=split, data=str(cfg.data.name))
    out = path.with_suffix(".eval.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{path}: {cfg.data.name}/{split}  top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
          f"loss {result['loss']:.4f}  (n={result['n']}) -> {out}")
    return result


def main(argv: list[str] | None = None) -> None:
    evaluate_checkpoint(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
