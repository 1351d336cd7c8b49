"""The engine: how an operator's per-sample kernel is applied (paths, the dispatch point, the op contract).

    paths.py     the device-agnostic implementations (fold, matmul, loop = the reference)
    dispatch.py  the one place that chooses a path, keyed by device type; the backend protocol
    pooling.py   GAP for the routing heads (cheap backward)
    mixing.py    kernels as linear mixes of parameters (BankMix, RowMix, aggregate)
    dynamic.py   DynamicConvOp: the contract an op file implements
"""

from dyconv_repro.ops.engine.dispatch import (
    Backend,
    ConvCall,
    backend_for,
    backends_disabled,
    dynamic_conv2d,
    exporting,
    register_backend,
    select_path,
)
from dyconv_repro.ops.engine.dynamic import DynamicConvOp
from dyconv_repro.ops.engine.mixing import BankMix, RowMix, aggregate
from dyconv_repro.ops.engine.paths import fold_conv2d, loop_conv2d, matmul_conv1x1
from dyconv_repro.ops.engine.pooling import gap, pool_tee

__all__ = ["Backend", "BankMix", "ConvCall", "DynamicConvOp", "RowMix", "aggregate", "backend_for",
           "backends_disabled", "dynamic_conv2d", "exporting", "fold_conv2d", "gap", "loop_conv2d",
           "matmul_conv1x1", "pool_tee", "register_backend", "select_path"]
