"""`dyconv-export ckpt=PATH format=onnx|torch_export [opset=18] [out=PATH] [batch=7] [tolerance=1e-4]
[decompose=auto|all|none] [overrides ...]`

Load a run's checkpoint (a run directory: its best.pt, else last.pt; or a checkpoint file), apply the deploy
transform (RefConv -> conv, Structured -> decomposed / plain, MixConv -> one depthwise conv where equivalent;
dynamic operators stay dynamic), export it with a dynamic batch, then run the file -- onnxruntime, or the
reloaded ExportedProgram -- at batch 1 and `batch` against eager PyTorch. Success is reported only when both
match within `tolerance` (relative to the largest logit); otherwise the file is removed, export.json keeps the
errors, and one line is printed (exit status 2). Output:
<run dir>/export/model.onnx (or model.pt2), or out=PATH, with export.json next to it (format, opset, errors per
batch, file size, ONNX node-type counts).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dyconv_repro.cli.common import split_args, user_errors_exit
from dyconv_repro.errors import UserError

USAGE = ("dyconv-export ckpt=PATH|RUN_DIR format=onnx|torch_export [opset=18] [out=PATH] [batch=7] [tolerance=1e-4] "
         "[decompose=auto|all|none] [Hydra overrides of the run's config ...]")
TOOL_KEYS = ("ckpt", "format", "opset", "out", "batch", "tolerance", "decompose")


def default_out(ckpt: Path, fmt: str) -> Path:
    from dyconv_repro.models.export import SUFFIX

    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "export" / f"model{SUFFIX[fmt]}"


@user_errors_exit
def export(argv: list[str]) -> dict:
    from dyconv_repro.models.deploy import decompose_mode, deploy_transform
    from dyconv_repro.models.export import DEFAULT_OPSET, FORMATS, export_and_verify, require_onnx
    from dyconv_repro.pipeline.runs import load_run

    kv, overrides = split_args(argv, TOOL_KEYS, "dyconv-export", USAGE)
    if "ckpt" not in kv:
        raise UserError(f"usage: {USAGE}")
    fmt = kv.pop("format", "onnx")
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        opset, batch, tolerance = int(kv.pop("opset", DEFAULT_OPSET)), int(kv.pop("batch", 7)), float(
            kv.pop("tolerance", 1e-4))
    except ValueError as e:
        raise UserError(f"opset, batch and tolerance must be numbers ({e}); {USAGE}") from None
    if batch <= 2:
        raise UserError(f"batch must be > 2 (the file is checked at batch 1 and a batch unlike the traced example's), "
                        f"got {batch}")
    decompose = decompose_mode(kv.pop("decompose", "auto"))
    if fmt == "onnx":
        require_onnx()  # before the model is built: a missing extra is one line, not a traceback
    cfg, model, _, path = load_run(kv["ckpt"], overrides)
    out = Path(kv["out"]) if "out" in kv else default_out(path, fmt)
    deployed = deploy_transform(model.cpu(), decompose)
    report = export_and_verify(deployed, out, fmt, int(cfg.data.image_size), opset, batch, tolerance)
    report.update(ckpt=str(path), model=str(cfg.model.name), op=str(cfg.op.name), decompose=decompose)
    report_path = out.with_name("export.json")
    report_path.write_text(json.dumps(report, indent=2))
    errs = ", ".join(f"batch {b}: rel {e['max_rel']:.2e} (abs {e['max_abs']:.2e})" for b, e in report["errors"].items())
    if not report["ok"]:
        out.unlink(missing_ok=True)  # a file that computes something else must not be picked up by mistake
        raise UserError(f"{out} does not match PyTorch ({errs}; tolerance {tolerance:g}); see {report_path}")
    nodes = sum(report.get("node_types", {}).values())
    print(f"exported {out} ({fmt}{f', opset {opset}, {nodes} nodes' if fmt == 'onnx' else ''}, "
          f"{report['file_bytes'] / 1e6:.2f} MB, dynamic batch); verified against PyTorch: {errs} -> {report_path}")
    return report


def main(argv: list[str] | None = None) -> None:
    export(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
