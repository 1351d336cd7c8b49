"""Which operators `trainer.compile=true` may train: those whose compiled training step was measured equal
to eager (ResNet-20, one SGD step in float64, inductor on CPU, DYCONV_NATIVE=0: tests/test_compile.py, slow tier).

A compiled step that is wrong would be silent, so an operator is refused with one line until it has been
measured; tests/test_compile.py re-measures the listed ops and fails when a list is out of date.

The measurement is in float64 because fp32 cannot tell a wrong lowering from a reordered sum: inductor lays
CPU convs out channels_last, a few ReLU inputs within rounding of zero change sign, and the gradients move by
up to 1e-2 relative. Eager alone does the same between NCHW and channels_last inputs
(scripts/compile_vs_eager_gradients.py). Issue 23 took this for an inductor bug in DY-Conv and CondConv; in
float64 every operator's compiled step equals eager (table below).
"""

from __future__ import annotations

from dyconv_repro.errors import UserError

# op -> what was measured: max relative gradient error over parameters, compiled vs eager, float64
# (ResNet-20, one step, inductor on CPU, DYCONV_NATIVE=0, torch 2.14.1, 2026-12-03)
COMPILE_VERIFIED = {
    "conv": "3.9e-14",
    "condconv": "4.7e-14",
    "dcd": "7.5e-8 at a BN bias whose true gradient is zero (measured against the floor); median 1.5e-14",
    "dynamicconv": "3.5e-14",
    "dynet": "8.1e-14",
    "kernelwarehouse": "2.6e-11",
    "mixconv": "5.8e-14 (policy=all: ResNet-20 has no depthwise conv)",
    "odconv": "3.5e-11",
    "refconv": "2.5e-14",
    "se": "1.7e-12",
    "structured": "4.4e-14",
    "weightnet": "3.2e-14",
}
# op -> why its compiled step is known to differ from eager (none today)
COMPILE_WRONG: dict[str, str] = {}


def check_compile_supported(op_name: str) -> None:
    """UserError unless `op_name`'s compiled training step is known to equal eager."""
    if op_name in COMPILE_VERIFIED:
        return
    why = COMPILE_WRONG.get(op_name, "its compiled training step has not been checked against eager yet "
                                     "(tests/test_compile.py; add it to COMPILE_VERIFIED once it passes)")
    raise UserError(f"trainer.compile=true is refused for op={op_name}: {why}; train it with "
                    "trainer.compile=false (ops checked so far: " + ", ".join(sorted(COMPILE_VERIFIED)) + ")")
