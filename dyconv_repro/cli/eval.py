"""`dyconv-eval ckpt=PATH [split=val] [overrides ...]`: evaluate a checkpoint, print and save top-1/top-5.

The model is rebuilt from the config stored in the checkpoint (or the run's config.yaml); Hydra-syntax
overrides of its keys change it, e.g. `data.root=/data/imagenet trainer.device=cuda` (`--help` lists the groups).
Results go to <ckpt>.eval.json next to the checkpoint.
"""

from __future__ import annotations

import json
import sys

from dyconv_repro.cli.common import split_args, user_errors_exit
from dyconv_repro.errors import UserError

USAGE = "dyconv-eval ckpt=PATH|RUN_DIR [split=val|train] [Hydra overrides of the run's config ...]"


@user_errors_exit
def evaluate_checkpoint(argv: list[str]) -> dict:
    import torch

    from dyconv_repro.data import build_dataset
    from dyconv_repro.engine.device import resolve_device
    from dyconv_repro.engine.evaluate import evaluate
    from dyconv_repro.pipeline.runs import load_run

    own, overrides = split_args(argv, ("ckpt", "split"), "dyconv-eval", USAGE)
    if "ckpt" not in own:
        raise UserError(f"usage: {USAGE}")
    split = own.get("split", "val")
    if split not in ("train", "val"):
        raise UserError(f"split must be train or val, got {split!r}")
    cfg, model, _, path = load_run(own["ckpt"], overrides)
    device = resolve_device(str(cfg.trainer.device))
    model.to(device)
    dataset = build_dataset(cfg.data, split, cfg.recipe)
    loader = torch.utils.data.DataLoader(dataset, batch_size=int(cfg.recipe.batch_size), shuffle=False,
                                         num_workers=int(cfg.data.num_workers))
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
