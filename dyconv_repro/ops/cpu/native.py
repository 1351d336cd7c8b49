"""The optional C++ kernels (csrc/): built once, loaded when present.

* batch_one.cpp: at batch 1 a dynamic layer's pooling, routing and kernel mix are 5-7 tiny aten calls whose
  dispatch, allocation and thread-pool wake-ups cost more than their arithmetic (40-60 % of a CIFAR-size
  conv on this 2-core CPU); the native kernel does the same arithmetic in one call.
* depthwise.cpp: the per-sample depthwise conv in channels_last (forward and both gradients); aten only
  has it as a grouped conv in NCHW, 2-2.5x slower than the static channels_last depthwise conv.
* mix.cpp: the bank mix coeff @ bank of a training batch in one pass (about 2x MKL's skinny product).
* sum_pool.cpp: a decomposed structured layer's sum-pool in one pass (at batch 1 the aten version is ~11 tiny
  calls that cost more than the small conv after it).

They are accelerators, never a requirement: without a C++ compiler, or with DYCONV_NATIVE=0, the Python
aten paths of the engine and of this backend run (and are the references the native kernels are tested against).

Build it with `dyconv-native` (`make install` does; ~2 min, needs g++ and ninja).
It is never compiled implicitly in the middle of a run: `get()` only loads an existing build. The build
lives in DYCONV_NATIVE_DIR (default ~/.cache/dyconv_repro/native) under a tag of the source, torch and
Python versions, so a changed source or an upgraded torch never loads a stale binary.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from dyconv_repro.ops.engine.dispatch import ThreadFlag

NAME = "dyconv_native"
CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / "module.cpp", CSRC / "batch_one.cpp", CSRC / "depthwise.cpp", CSRC / "mix.cpp", CSRC / "sum_pool.cpp"]
HEADERS = [CSRC / "native.h"]
_UNSET = object()
_module = _UNSET


def build_dir() -> Path:
    """Where this source, torch and Python's build lives."""
    root = Path(os.environ.get("DYCONV_NATIVE_DIR") or Path.home() / ".cache" / "dyconv_repro" / "native")
    digest = hashlib.sha256(torch.__version__.encode() + sys.version.encode())
    for f in SOURCES + HEADERS:
        digest.update(f.read_bytes())
    tag = digest.hexdigest()[:16]
    return root / tag


def disabled() -> bool:
    return os.environ.get("DYCONV_NATIVE", "1").strip().lower() in ("0", "false", "off", "no")


def _library() -> Path:
    return build_dir() / f"{NAME}.so"


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get():
    """The loaded native module, or None (not built, disabled, or it failed to load: warned once)."""
    global _module
    if _module is _UNSET:
        _module = None
        path = _library()
        if not disabled() and path.exists():
            try:
                _module = _import(path)
            except (ImportError, OSError) as e:
                warnings.warn(f"dyconv native kernels at {path} did not load ({e}); using the Python paths. "
                              "Rebuild it with `dyconv-native`.", stacklevel=2)
    return _module


_SUSPENDED = ThreadFlag()


def suspended():
    """Within the block the ops run their aten paths only: the references the native kernels are tested
    against (`DynamicConvOp.reference_forward` also disables every backend) never share code with what they check."""
    return _SUSPENDED.raised()


def is_suspended() -> bool:
    return bool(_SUSPENDED)


def status() -> str:
    """One line for benchmark pages and logs: are the native kernels in use, and if not, why."""
    if disabled():
        return "off (DYCONV_NATIVE=0)"
    if get() is not None:
        return "on"
    if not _library().exists():
        return "off (not built: dyconv-native)"
    return "off (failed to load)"


def build(verbose: bool = False):
    """Compile (or find up to date) the native kernel and load it; raises when the toolchain fails."""
    global _module
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime": not ours
    from torch.utils.cpp_extension import load

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    module = load(name=NAME, sources=[str(f) for f in SOURCES], build_directory=str(out), extra_cflags=["-O3", "-fopenmp"],
                  extra_ldflags=["-fopenmp"], verbose=verbose)  # -fopenmp: at::parallel_for on torch's own libgomp
    _module = None if disabled() else module
    return module


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dyconv-native", description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--status", action="store_true", help="only print whether the kernel is built and used")
    args = parser.parse_args(argv)
    if not args.status:
        try:
            build(args.verbose)
        except Exception as e:  # the toolchain's own error (no compiler, no ninja, ...): say so, keep the Python path
            print(f"native kernels not built: {e}\nThe Python paths will be used.", file=sys.stderr)
            return 1
    print(f"native kernels: {status()} ({_library()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
