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

from dyconv_repro.cli.common import parse_overrides, user_errors_exit
from dyconv_repro.errors import UserError

USAGE = "usage: dyconv-deploy ckpt=PATH [data=val|random] [tolerance=1e-4] [decompose=auto|all|none] [out=PATH]"


@user_errors_exit
def deploy(argv: list[str]) -> dict:
    import torch

    from dyconv_repro.cli.eval import load_trained_model
    from dyconv_repro.engine.checkpoint import save_atomic
    from dyconv_repro.engine.trainer import resolve_device
    from dyconv_repro.models.deploy import baseline_config, decompose_mode, deploy_model

    kv, rest = parse_overrides(argv)
    if rest or "ckpt" not in kv:
        raise UserError(USAGE)
    path = Path(kv.pop("ckpt"))
    source = kv.pop("data", "val")
    tolerance = float(kv.pop("tolerance", 1e-4))
    decompose = decompose_mode(kv.pop("decompose", "auto"))
    out = Path(kv.pop("out")) if "out" in kv else None
    if source not in ("val", "random"):
        raise UserError(f"data must be val or random, got {source!r}")
    model, cfg, _ = load_trained_model(path, kv)
    device = resolve_device(str(cfg.trainer.get("device", "auto")))
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
