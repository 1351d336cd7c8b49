"""Which operators `trainer.compile=true` may train: those whose compiled training step was measured equal
to eager (gradients within 1e-3 relative; tests/test_compile.py, slow tier, checks this list both ways).

torch.compile is refused for the others with one line, because a compiled step that is wrong is silent:
the loss matches eager while the gradients do not (DY-Conv under inductor, scripts/compile_dynamicconv_repro.py).
"""

from __future__ import annotations

from dyconv_repro.errors import UserError

# op -> what was measured (ResNet-20, one SGD step, inductor on CPU, DYCONV_NATIVE=0)
COMPILE_VERIFIED = {
    "conv": "gradients match eager",
    "condconv": "gradients match eager",
}
COMPILE_WRONG = {
    "dynamicconv": "inductor computes DY-Conv's routing gradients wrong when the network is one graph "
                   "(relative gradient error up to 0.39; scripts/compile_dynamicconv_repro.py)",
}


def check_compile_supported(op_name: str) -> None:
    """UserError unless `op_name`'s compiled training step is known to equal eager."""
    if op_name in COMPILE_VERIFIED:
        return
    why = COMPILE_WRONG.get(op_name, "its compiled training step has not been checked against eager yet")
    raise UserError(f"trainer.compile=true is refused for op={op_name}: {why}; train it with "
                    "trainer.compile=false (ops checked so far: " + ", ".join(sorted(COMPILE_VERIFIED)) + ")")
