"""`DynamicConvOp`: the contract between an input-dependent operator's math and the engine that runs it.

An op file subclasses it and writes the paper's math only:

- `kernel(x) -> (weight, bias)`: the per-sample kernels (B, C_out, C_in/g, kh, kw) and biases (B, C_out) or None;
- optionally `kernel_factors(x) -> (coeff, param, bias, mix)`: the same kernels as a linear mix
  W = mix.make(coeff, param) (`mixing.BankMix`, `mixing.RowMix`), which lets a backend regenerate them instead
  of keeping them;
- optionally `training_forward(x)`: an exact form without per-sample kernels (DyNet's C_out*g_t-filter
  training form), run when the op's `fused` is False;
- optionally the block-routing protocol (`block_head`, `attach_block_routing`; see ops/routing.py).

`forward` belongs to the engine (`dispatch.run`); `reference_forward` applies the same kernels one sample at a
time with every backend disabled: the oracle of the equivalence tests.
"""

from __future__ import annotations

from torch import Tensor, nn

from dyconv_repro.ops.base import ConvOp, absent
from dyconv_repro.ops.engine import dispatch
from dyconv_repro.ops.engine.paths import is_pointwise, loop_conv2d

BACKEND_CACHE_PREFIX = "_backend_"  # op.__dict__ keys a backend may cache derived values under (never saved)


class DynamicConvOp(ConvOp):
    """Base of the per-sample-kernel operators (see the module docstring for the contract).

    `path` forces a per-sample conv implementation ("auto" lets the dispatch point choose; tests, benchmarks).
    `fused=False` runs `training_forward` instead of per-sample kernels, where the op has one.
    Routing input: GAP of the layer input by default; under block routing the enclosing block's hook puts
    the shared routing input in `self._slot.value` and the op reads it through `block_input()`.
    """

    path: str = "auto"
    fused: bool | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._slot = None
        self.pointwise = is_pointwise(self.kernel_size, self.padding, self.groups)

    @property
    def block_routed(self) -> bool:
        return self._slot is not None

    def block_input(self) -> Tensor:
        """The routing input handed over by the enclosing block (block routing only)."""
        value = self._slot.value
        if value is None:
            raise RuntimeError(f"{type(self).__name__} is wired for block routing but its block's hook did not "
                               "run: call the enclosing block, not the op alone")
        return value

    def kernel(self, x: Tensor) -> tuple[Tensor, Tensor | None]:  # pragma: no cover - abstract
        raise NotImplementedError

    def kernel_factors(self, x: Tensor):
        """(coeff, param, bias, mix) with W = mix.make(coeff, param), or None (the kernel is not such a mix)."""
        return None

    @absent
    def training_forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no form without per-sample kernels (fused=False)")

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.fused is False:
            return self.training_forward(x)
        return dispatch.run(self, x)

    def fused_forward(self, x: Tensor) -> Tensor:
        """The per-sample-kernel form, whatever `fused` says."""
        return dispatch.run(self, x)

    def reference_forward(self, x: Tensor) -> Tensor:
        """Slow reference: the same per-sample kernels, no backend, applied one sample at a time."""
        with dispatch.backends_disabled():
            weight, bias = self.kernel(x)
        return loop_conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def __getstate__(self):
        state = super().__getstate__()
        for key in [k for k in state if k.startswith(BACKEND_CACHE_PREFIX)]:
            state.pop(key)  # scratch views, plans, derived values: rebuilt on use
        return state

    # --- block routing protocol (see dyconv_repro/ops/routing.py) ---
    @classmethod
    @absent
    def block_head(cls, in_features: int, ops: list) -> nn.Module:
        """The module that turns the pooled block input into one routing input per op."""
        raise NotImplementedError(f"{cls.__name__} has no block-shared routing")

    def attach_block_routing(self, slot, in_features: int) -> None:
        """Read the routing input from `slot` (a tensor of `in_features` columns) from now on."""
        self._slot = slot
