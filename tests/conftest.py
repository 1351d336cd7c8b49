"""Shared fixtures: compose the real Hydra config in-process and run small trainings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # the suite runs under xdist on 2 cores


def compose(overrides: list[str] | None = None):
    """The composed, validated train config, as `dyconv-train <overrides>` would see it."""
    from dyconv_repro.config import compose as compose_config

    return compose_config(list(overrides or []))


@pytest.fixture
def make_cfg(tmp_path):
    def _make(*overrides: str):
        return compose([f"output_dir={tmp_path / 'runs'}", "trainer.progress=false", *overrides])

    return _make


def run_cli(args: list[str], cwd: Path, timeout: int = 300, env: dict | None = None, check: bool = False):
    """Run a console entry point of this venv; returns CompletedProcess (text)."""
    exe = Path(sys.executable).parent / args[0]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run([str(exe), *args[1:]], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def native_kernel():
    """The native kernels, built here if `make install` did not (None only without a C++ toolchain)."""
    import shutil

    from dyconv_repro.ops.cpu import native

    if native.disabled():
        return None
    module = native.get()
    if module is None and shutil.which("c++") and shutil.which("ninja"):
        module = native.build()
    return module


def native_kernel_or_skip():
    """The native kernels; skips the test only on a machine without a C++ toolchain."""
    module = native_kernel()
    if module is None:
        pytest.skip("no C++ toolchain (or DYCONV_NATIVE=0): the native kernels are not built")
    return module


class CountingNative:
    """The native module with the calls of the functions whose names start with `prefix` counted, so that a
    test knows the native path ran (or did not)."""

    def __init__(self, module, prefix: str):
        self.module, self.prefix, self.calls = module, prefix, 0

    def __getattr__(self, name):
        attr = getattr(self.module, name)
        if not name.startswith(self.prefix):
            return attr

        def counted(*args):
            self.calls += 1
            return attr(*args)

        return counted


def count_native_calls(monkeypatch, prefix: str) -> CountingNative:
    """Route `native.get()` through a CountingNative for this test (skips without a C++ toolchain)."""
    from dyconv_repro.ops.cpu import native

    wrapper = CountingNative(native_kernel_or_skip(), prefix)
    monkeypatch.setattr(native, "get", lambda: wrapper)
    return wrapper


@pytest.fixture(params=["python", "native"])
def batch_one_impl(request, monkeypatch):
    """Run a test once with the Python batch-1 path and once with the native kernel (skipped only on a
    machine without a C++ toolchain); the fixture's value is the implementation name."""
    from dyconv_repro.ops.cpu import native

    if request.param == "python":
        monkeypatch.setattr(native, "get", lambda: None)
    else:
        native_kernel_or_skip()
    return request.param
