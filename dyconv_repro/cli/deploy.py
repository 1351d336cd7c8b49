"""`dyconv-deploy ckpt=PATH [data=val|random] [tolerance=1e-4] [decompose=auto] [out=PATH] [key=value ...]`

eval mode -> deep copy -> decompose structured layers (SumPool + smaller conv: decompose=all every one,
auto those where the SumPool pays on CPU, none) and re-parameterize
every other operator that can (RefConv, ...) -> verify the logits on a batch (validation data, or
random inputs with data=random) -> save a plain model + report (params, MAdds before/after, max
|dlogit|, top-1 before/after with validation data). Refuses to save when the outputs drift beyond
the tolerance. Output: <run dir>/deployed.pt and deploy.json (or out=PATH).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from dyconv_repro.cli.common import split_args, user_errors_exit
from dyconv_repro.errors import UserError

USAGE = ("dyconv-deploy ckpt=PATH|RUN_DIR [data=val|random] [tolerance=1e-4] [decompose=auto|all|none] [out=PATH] "
         "[Hydra overrides of the run's config ...]")


@user_errors_exit
def deploy(argv: list[str]) -> dict:
    import torch

    from dyconv_repro.engine.checkpoint import save_atomic
    from dyconv_repro.engine.device import resolve_device
    from dyconv_repro.models.deploy import baseline_config, decompose_mode
    from dyconv_repro.pipeline.deploy import deploy_model
    from dyconv_repro.pipeline.runs import load_run

    own, overrides = split_args(argv, ("ckpt", "data", "tolerance", "decompose", "out"), "dyconv-deploy", USAGE)
    if "ckpt" not in own:
        raise UserError(f"usage: {USAGE}")
    source = own.get("data", "val")
    try:
        tolerance = float(own.get("tolerance", 1e-4))
    except ValueError:
        raise UserError(f"tolerance must be a number, got {own['tolerance']!r}") from None
    decompose = decompose_mode(own.get("decompose", "auto"))
    out = Path(own["out"]) if "out" in own else None
    if source not in ("val", "random"):
        raise UserError(f"data must be val or random, got {source!r}")
    cfg, model, _, path = load_run(own["ckpt"], overrides)
    device = resolve_device(str(cfg.trainer.device))
    size = int(cfg.data.image_size)
    loader = None
    if source == "val":
        from dyconv_repro.data import build_dataset

        dataset = build_dataset(cfg.data, "val", cfg.recipe)
        loader = torch.utils.data.DataLoader(dataset, batch_size=min(int(cfg.recipe.batch_size), 256))
        batches = [next(iter(loader))[0]]
    else:
        batches = [torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(0))]
    deployed, report = deploy_model(cfg, model, batches, device, tolerance, data_loader=loader, decompose=decompose)
    out = out or (path.parent.parent / "deployed.pt" if path.parent.name == "checkpoints" else path.with_name("deployed.pt"))
    drift = report["max_abs_logit_diff"]
    lines = [f"params      {report['params_before']:>12,d} -> {report['params_after']:>12,d}"]
    if "madds_before" in report:
        lines.append(f"MAdds       {report['madds_before'] / 1e6:>11.2f}M -> {report['madds_after'] / 1e6:>11.2f}M")
    if "top1_before" in report:
        lines.append(f"top-1       {report['top1_before']:>12.2f} -> {report['top1_after']:>12.2f}")
    lines.append(f"max |dlogit| {drift:.3e} (tolerance {tolerance:g})")
    lines.append(f"loads into the plain baseline: {report['loads_into_baseline']}")
    if "decomposition" in report:
        d = report["decomposition"]
        lines.append(f"structured layers: {d['structured_layers']}, decomposed by auto: {len(d['decomposed_by_auto'])} "
                     f"({d['rule']}); decompose={decompose}")
    print("\n".join(lines))
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    if drift > tolerance:
        raise UserError(f"deployed model drifts by {drift:.3e} > tolerance {tolerance:g}; not saved")
    config = baseline_config(cfg) if report["loads_into_baseline"] else cfg
    save_atomic({"model": deployed.state_dict(), "config": OmegaConf.to_container(config, resolve=True),
                 "report": report}, out)
    if not report["loads_into_baseline"]:  # e.g. decomposed structured layers: keep the module itself
        save_atomic({"module": deployed.cpu(), "report": report}, out.with_name(out.stem + ".module.pt"))
    print(f"saved {out}")
    report["saved"] = str(out)
    return report


def main(argv: list[str] | None = None) -> None:
    deploy(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
