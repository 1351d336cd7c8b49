"""engine/cpu_heap.py: `keep` really keeps freed memory in the heap (checked in a fresh process, against the
allocator's default there), bad modes are one clear error, and other C libraries are left alone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from dyconv_repro.engine import cpu_heap
from dyconv_repro.errors import UserError

# In a fresh process: RSS before, with and after freeing one 16 MiB tensor (below the kept mmap threshold).
PROBE = """
import json, sys, torch
from dyconv_repro.engine import cpu_heap
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
torch.set_num_threads(1)  # no thread pool starts (its stacks would count as held memory) during the probe
torch.ones(64).add_(1)  # the first aten call's own one-time allocations, outside the measurement
line = cpu_heap.configure(sys.argv[1])
before = rss_mb()
t = torch.ones(4 << 20)
held = rss_mb()
del t
print(json.dumps({"line": line, "held": held - before, "after": rss_mb() - before}))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_holds_freed_memory_where_the_default_returns_it():
    kept, default = _probe("keep"), _probe("default")
    assert kept["line"].startswith("keep: glibc keeps freed memory") and default["line"].startswith("default")
    for r in (kept, default):
        assert r["held"] > 14, r  # the tensor was resident
    assert kept["after"] > 14, kept  # freed but still in the heap: the next step reuses it without faults
    assert default["after"] < 4, default  # glibc's default unmapped it: the next step faults it in again


def test_unknown_mode_names_the_valid_ones():
    with pytest.raises(UserError, match="expected one of keep, default"):
        cpu_heap.configure("tcmalloc")


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_heap, "_libc", cpu_heap._UNSET)  # looked up again, with the patched libc_ver
    monkeypatch.setattr(cpu_heap, "_kept", False)
    monkeypatch.setattr(cpu_heap.platform, "libc_ver", lambda: ("", ""))
    assert cpu_heap.configure("keep") == "allocator default (not glibc: cpu_heap=keep does nothing here)"
    assert not cpu_heap._kept
    cpu_heap.release()  # a no-op there, not an error
