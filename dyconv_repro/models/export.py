"""Export a (deployed) model with a dynamic batch to ONNX or torch.export, and verify the file against eager.

The engine's export form (`ops/engine/dispatch.py`, `exporting()`) makes every operator traceable with the batch
as the only symbolic dimension; `prepare_export` pins that form on a model so that it holds under any tracer,
not only those `exporting()` detects. A file is reported good only after it was run -- onnxruntime for ONNX,
the reloaded ExportedProgram for torch.export -- at batch 1 and a batch > 2 and matched eager PyTorch on the
same inputs (`verify`). onnx / onnxruntime / onnxscript are the optional `export` extra, imported only here.
"""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine.dispatch import export_mode

FORMATS = ("onnx", "torch_export")
SUFFIX = {"onnx": ".onnx", "torch_export": ".pt2"}
DEFAULT_OPSET = 18
EXAMPLE_BATCH = 2  # the traced example: not 1, which tracers specialize (0/1 specialization)
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportForm(nn.Module):
    """`model` whose forward runs inside `export_mode()`: the export form under any tracer (fx, a converter
    built on jit.trace, ...), in eager mode too. State-dict keys gain the prefix `model.`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():  # torch.export / dynamo: `exporting()` already says so
            return self.model(x)
        with export_mode():
            return self.model(x)


def prepare_export(model: nn.Module) -> ExportForm:
    """`model` in eval mode, wrapped so that every operator runs its export form (see `ExportForm`)."""
    return ExportForm(model.eval()).eval()


def require_onnx() -> None:
    """UserError (one line) unless the export extra is installed."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"format=onnx needs {', '.join(missing)}: pip install -e .[export]")


def batch_dim(name: str = "batch"):
    return torch.export.Dim(name, min=1)


def export_onnx(model: nn.Module, example: Tensor, path: Path, opset: int = DEFAULT_OPSET, dynamo: bool = True) -> Path:
    """Write `model` to `path` as ONNX with a dynamic batch (the dynamo exporter, or the legacy TorchScript one
    with dynamo=False). Weights are stored inside the file."""
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = prepare_export(model)
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_shapes={"x": {0: batch_dim()}}, external_data=False,
                              verbose=False)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def export_program(model: nn.Module, example: Tensor, path: Path | None = None):
    """torch.export.export of `model` with a dynamic batch; saved to `path` (.pt2) when given."""
    with torch.no_grad():
        program = torch.export.export(prepare_export(model), (example,), dynamic_shapes={"x": {0: batch_dim()}})
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    return program


def onnx_runner(path: Path):
    """A function running the ONNX file at `path` on CPU in onnxruntime: Tensor -> Tensor."""
    require_onnx()
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


def program_runner(program_or_path):
    """A function running an ExportedProgram (or a saved .pt2): Tensor -> Tensor."""
    program = program_or_path
    if isinstance(program_or_path, (str, Path)):
        program = torch.export.load(str(program_or_path))
    module = program.module()
    return lambda x: module(x).detach()


def compare(reference: Tensor, got: Tensor) -> dict:
    """Max absolute error and max error relative to the reference's largest magnitude."""
    if tuple(got.shape) != tuple(reference.shape):
        return {"max_abs": float("inf"), "max_rel": float("inf"), "shape": list(got.shape)}
    err = (got.float() - reference.float()).abs().max().item()
    return {"max_abs": err, "max_rel": err / max(reference.abs().max().item(), 1e-12)}


def verify(model: nn.Module, run, image_size: int, batches=(1, 7), seed: int = 0) -> dict:
    """{batch: compare(eager, run)} on random inputs, eager being `model` in eval mode without the export form."""
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for b in batches:
        x = torch.randn(b, 3, image_size, image_size, generator=gen)
        with torch.no_grad():
            ref = model(x)
        out[b] = compare(ref, run(x))
    return out


def worst(errors: dict) -> float:
    return max(e["max_rel"] for e in errors.values())


def onnx_node_counts(path: Path) -> dict:
    """{op_type: count} of the ONNX graph's nodes (functions' bodies included)."""
    import onnx

    proto = onnx.load(str(path))
    counts = collections.Counter(n.op_type for n in proto.graph.node)
    for fn in proto.functions:
        counts.update(n.op_type for n in fn.node)
    return dict(sorted(counts.items()))


def export_and_verify(model: nn.Module, path: Path, fmt: str, image_size: int, opset: int = DEFAULT_OPSET,
                      batch: int = 7, tolerance: float = 1e-4) -> dict:
    """Export `model` to `path` in `fmt`, run the file at batch 1 and `batch`, compare with eager; the report
    says `ok` only when every relative error is within `tolerance`."""
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch <= 2:
        raise UserError(f"batch must be > 2 (the file is checked at batch 1 and a batch unlike the example's "
                        f"{EXAMPLE_BATCH}), got {batch}")
    model = model.eval()
    example = torch.randn(EXAMPLE_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    report = {"format": fmt, "file": str(path), "image_size": image_size, "dynamic": {"x": {"0": "batch"}},
              "tolerance_rel": tolerance}
    if fmt == "onnx":
        export_onnx(model, example, path, opset)
        run = onnx_runner(path)
        report.update(opset=opset, node_types=onnx_node_counts(path))
    else:
        export_program(model, example, path)
        run = program_runner(path)
        report["opset"] = None
    errors = verify(model, run, image_size, (1, batch))
    report["errors"] = {str(b): e for b, e in errors.items()}
    report["file_bytes"] = Path(path).stat().st_size
    report["ok"] = worst(errors) <= tolerance
    return report
