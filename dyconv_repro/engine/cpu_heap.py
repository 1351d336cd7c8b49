"""Keep freed CPU memory in the process heap, so a step's transient tensors do not come back as new pages.

Why: glibc gives a freed block above its mmap threshold back to the OS (munmap) and trims the heap top once
more than its trim threshold is free; the next training step allocates the same sizes again and the kernel
faults every page in anew. A dynamic conv makes multi-MB tensors each step -- per-sample kernels and their
gradients, 4.7 MB a DY-Conv 64->64 3x3 layer at batch 32 -- and a page fault costs ~2.6 us on this VM.
Measured on the 2-thread CPU (DY-Conv 64@8^2 3x3, batch 32, fwd+bwd, medians of 40 steps, two pairs of
processes): 17.1-18.5 ms -> 13.4-15.5 ms with the heap kept; the static conv 7.4-7.9 -> 7.4-8.4 ms.

`keep` is what `python -m torch.backends.xeon.run_cpu` gets by preloading tcmalloc or jemalloc (PyTorch's
CPU launcher), done with glibc's own knobs, so there is nothing to install: `mallopt(M_MMAP_THRESHOLD,
32 MiB)` (glibc's largest; bigger blocks still get their own mapping) and `mallopt(M_TRIM_THRESHOLD, 1 GiB)`.
Setting the mmap threshold also switches off glibc's adaptive threshold. The price: the resident size
stays near the largest step's peak instead of shrinking between steps (freed memory is reused, not
returned). `release()` gives it back on demand (the benchmark does before each memory measurement).

It is process-wide, so it is applied by the entry points (the trainer on CPU, `dyconv-bench`), never on
import, and `default` leaves the allocator as it is. Not glibc (macOS, musl): nothing to do, said so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from dyconv_repro.errors import UserError

MODES = ("keep", "default")
MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>

_UNSET = object()
_libc = _UNSET
_kept = False


def _glibc():
    """glibc through ctypes, or None where the C library is something else; looked up once (libc_ver scans
    the interpreter's binary, and `release()` runs before every memory reading of the benchmark)."""
    global _libc
    if _libc is _UNSET:
        _libc = None
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            except OSError:
                pass
    return _libc


def configure(mode: str) -> str:
    """Apply `mode` ("keep" | "default") to this process; returns the line that logs and pages record."""
    if mode not in MODES:
        raise UserError(f"cpu_heap={mode!r}: expected one of {', '.join(MODES)}")
    global _kept
    libc = _glibc()
    if mode == "keep" and libc is not None and not _kept:
        if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
            return "allocator default (glibc refused mallopt)"
        _kept = True
    return describe(mode)


def describe(mode: str = "keep") -> str:
    """What the allocator does in this process now (for logs and benchmark pages)."""
    if _kept:
        note = "" if mode == "keep" else " (kept earlier in this process: it cannot be undone)"
        return (f"keep: glibc keeps freed memory (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
                f"trim threshold {TRIM_THRESHOLD >> 30} GiB){note}")
    if mode == "keep" and _glibc() is None:
        return "allocator default (not glibc: cpu_heap=keep does nothing here)"
    return "default: the C library's own allocator settings"


def release() -> None:
    """Give the freed heap pages back to the OS now (malloc_trim(0)); a no-op where that is not glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
