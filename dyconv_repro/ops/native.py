"""Old import path of the native kernels' loader, now `dyconv_repro.ops.cpu.native` (kept for callers written
against it, e.g. ../shared/gpu/). Not imported by the package itself."""

from dyconv_repro.ops.cpu.native import build, build_dir, disabled, get, main, status, suspended  # noqa: F401
