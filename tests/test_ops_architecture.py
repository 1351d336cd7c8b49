"""The operator package's shape: op files hold math, the engine never reaches into a backend, and the library is
complete without its CPU backend."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import dyconv_repro.ops as ops_pkg
from dyconv_repro.ops import OPS

OPS_DIR = Path(ops_pkg.__file__).parent


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import in `path`, function-local ones included (relative resolved)."""
    package = "dyconv_repro.ops" + "".join("." + p for p in path.parent.relative_to(OPS_DIR).parts)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, [a.name for a in node.names]))
    return out


def test_engine_never_imports_a_backend():
    engine = sorted((OPS_DIR / "engine").glob("*.py"))
    assert engine
    for path in engine:
        for module, _ in imports(path):
            assert not module.startswith("dyconv_repro.ops.cpu"), f"{path.name} imports {module}"


def test_op_files_import_no_private_name_and_no_backend():
    op_files = {Path(sys.modules[OPS.get(n).__module__].__file__) for n in OPS.names()}
    assert len(op_files) >= 9
    for path in op_files:
        for module, names in imports(path):
            assert not module.startswith("dyconv_repro.ops.cpu"), f"{path.name} imports the CPU backend"
            if module.startswith("dyconv_repro.ops."):
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {module}"


def test_op_files_hold_no_timing_tables():
    """Measurements live on the benchmark pages (results/benchmarks/), not in op docstrings."""
    for path in {Path(sys.modules[OPS.get(n).__module__].__file__) for n in OPS.names()}:
        text = path.read_text()
        assert " us " not in text and " ms " not in text and "img/s" not in text, path.name


BARE = r"""
import sys
{hide}
import torch
from dyconv_repro.ops import OPS, build_op
from dyconv_repro.ops.engine import DynamicConvOp, dispatch
from dyconv_repro.models.build import build_model
from omegaconf import OmegaConf
assert dispatch.registered_backends() == {{}}, dispatch.registered_backends()
assert "dyconv_repro.ops.cpu" not in sys.modules or sys.modules["dyconv_repro.ops.cpu"] is None
torch.manual_seed(0)
for name in OPS.names():
    cls = OPS.get(name)
    if not issubclass(cls, DynamicConvOp):
        continue
    for k, g, b in ((3, 1, 3), (1, 1, 2), (3, 8, 2), (3, 1, 1)):
        op = build_op(name, 8, 8, k, groups=g, bias=True)
        x = torch.randn(b, 8, 7, 7, requires_grad=True)
        y = op(x)
        y.sum().backward()
        gx = x.grad.clone()
        x.grad = None
        ref = op.reference_forward(x)
        ref.sum().backward()
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-4)
        with torch.no_grad():  # eval reference: ops with a BN in their routing (ODConv, DCD) normalize differently
            op.eval()
            torch.testing.assert_close(op(x[:1]), op.reference_forward(x)[:1], atol=1e-5, rtol=1e-4)
print("bare ok")
"""


def _run_bare(hide: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", BARE.format(hide=hide)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_library_is_complete_without_the_cpu_backend_package():
    """As if ops/cpu/ were deleted: every dynamic op still trains and infers, equal to its reference."""
    proc = _run_bare('sys.modules["dyconv_repro.ops.cpu"] = None')
    assert proc.returncode == 0 and "bare ok" in proc.stdout, proc.stderr[-3000:]


def test_cpu_backend_can_be_switched_off():
    proc = _run_bare("", env={"DYCONV_CPU_BACKEND": "0"})
    assert proc.returncode == 0 and "bare ok" in proc.stdout, proc.stderr[-3000:]
