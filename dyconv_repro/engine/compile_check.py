"""Which operators `trainer.compile=true` may train: those whose compiled training step was measured equal
to eager (ResNet-20, one step, inductor on CPU, DYCONV_NATIVE=0: tests/test_compile.py, slow tier).

torch.compile is refused for the others with one line, because a compiled step that is wrong is silent:
the loss matches eager while the gradients do not (DY-Conv under inductor). tests/test_compile.py (slow tier)
re-measures the listed ops and fails when a list is out of date; scripts/repro_inductor_dyconv.py is the
standalone (torch-only) reproduction of the DY-Conv case for an upstream report. An op in neither list is refused.
"""

from __future__ import annotations

from dyconv_repro.errors import UserError

# op -> what was measured (ResNet-20, one SGD step, inductor on CPU, DYCONV_NATIVE=0)
COMPILE_VERIFIED = {
    "conv": "gradients match eager",
}
COMPILE_WRONG = {
    "condconv": "inductor computes CondConv's gradients wrong on ResNet-20 (relative gradient error median 6.8e-3, "
                "max 2.1e-2 at a router bias; tests/test_compile.py, torch 2.14.1, 2026-12-03)",
    "dynamicconv": "inductor computes DY-Conv's routing gradients wrong when the network is one graph "
                   "(relative gradient error up to 0.39, median 1.3e-2; issue 23)",
}


def check_compile_supported(op_name: str) -> None:
    """UserError unless `op_name`'s compiled training step is known to equal eager."""
    if op_name in COMPILE_VERIFIED:
        return
    why = COMPILE_WRONG.get(op_name, "its compiled training step has not been checked against eager yet")
    raise UserError(f"trainer.compile=true is refused for op={op_name}: {why}; train it with "
                    "trainer.compile=false (ops checked so far: " + ", ".join(sorted(COMPILE_VERIFIED)) + ")")
