"""`kernelwarehouse`: KernelWarehouse (Li & Yao, ICML 2024, arXiv 2406.07879; official OSVAI/KernelWarehouse).

A layer's kernel W (C_out, C_in/g, kh, kw) is cut into m disjoint cells of one shape (c_o, c_i, s_h, s_w); each
cell is a mix of the n cells e_1..e_n of a *warehouse* shared by the layers of a stage:

    w_j(x) = sum_i alpha_ji(x) e_i            j = 1..m (the layer's mixtures), i = 1..n (the warehouse's cells)

Cell grid (official `KWconvNd.forward`): mixture j = (s * g_o + a) * g_i + b covers output block a (c_o rows),
input block b (c_i columns) and spatial position s (cells are 1x1 with `spatial_partition`, else the whole
kernel), with g_o = C_out / c_o, g_i = (C_in/g) / c_i. Cell sizes: c_i = gcd of the warehouse layers' C_in/g times
`cell_inplane_ratio`, c_o likewise; n = (sum of the layers' m) * `cell_num_ratio` (1 = "KW 1x": as many cell
parameters as the static convs, 4 = "4x", 1/2 = "1/2x" ...).

Attention ("contrasting-driven attention function", official `Attention.forward`): h = ReLU(BN(FC(GAP(x)))) (FC
without bias, hidden max(int(C_in * reduction), 16)); z = FC2(h) gives n + 1 values per mixture, the last for a
zero cell; z_j <- z_j / (sum |z_j| + 1e-3); then z <- (1 - t) z + t * A, with A the one-hot "assigned cell" of
each mixture; the zero cell's column is dropped. A assigns the layers' mixtures to consecutive cells in model
order (ratio r >= 1: mixture j -> cell start + j*r; r = 1/p: mixture j gets the next cell when
j % p == (j // p) % p, else the zero cell), so at t = 1 each layer starts as a plain conv built from its own
cells. With `nonlocal_basis_ratio` < 1 (the 1/2x ResNet-50), FC2 gives each mixture its own cells' values, B basis
values (B = max(int((n - own) * ratio), 16)) and the zero cell's; a bias-free FC3 maps the basis to the other
layers' cells, and a learned bias is added (official `map_to_cell_basis`; a warehouse of one layer keeps the plain
head, where the official code would build an empty FC3). The official trainer takes t from 1 to 0 linearly per iteration over the first 20 epochs (15 for
MobileNetV2): `recipe.temperature` {init: 1, final: 0}. The module's own t is 0 (official `temp_value`).

The warehouse is a model-level object: `KWConv2d.share_across_layers` (called by the surgery once every layer
is replaced) groups the layers (`warehouses`: name -> regex over layer names, first match wins; unmatched layers
share by traced stage, depthwise apart), creates one `KernelWarehouse` per group under
`model.kernel_warehouse`, and binds each layer to its slice. A layer built alone owns a private warehouse.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from fractions import Fraction

import torch
from torch import Tensor, nn

from dyconv_repro.errors import UserError
from dyconv_repro.ops.engine import DynamicConvOp, gap
from dyconv_repro.ops.layers import batch_norm, kernel_std
from dyconv_repro.ops.registry import OPS

MIN_HIDDEN = 16      # the official Attention's minimum hidden width
NORM_EPS = 1e-3      # the official L1 normalisation's epsilon
MIN_BASIS = 16       # the official minimum number of non-local basis cells
CONTAINER = "kernel_warehouse"   # attribute of the model that holds the shared warehouses


def _ratio(value, what: str) -> Fraction:
    """cell_num_ratio: an integer >= 1 or 1/p (the official assignment rule has no other form)."""
    r = Fraction(float(value)).limit_denominator(64)
    if r <= 0 or abs(float(r) - float(value)) > 1e-9 or (r >= 1 and r.denominator != 1) or (r < 1 and r.numerator != 1):
        raise UserError(f"kernelwarehouse {what} must be an integer >= 1 (1x, 2x, 4x) or 1/p (0.5, 0.25, ...), "
                        f"got {value}")
    return r


def assigned_cells(num_mixtures: int, ratio: Fraction, start: int) -> tuple[list[int | None], int]:
    """Each mixture's assigned warehouse cell (None = the zero cell) and the next free cell (official
    `Attention.init_temperature`)."""
    homes: list[int | None] = []
    if ratio >= 1:
        step = int(ratio)
        for j in range(num_mixtures):
            homes.append(start + j * step)
        return homes, start + num_mixtures * step
    p = ratio.denominator
    for j in range(num_mixtures):
        if j % p == (j // p) % p:
            homes.append(start)
            start += 1
        else:
            homes.append(None)
    return homes, start


class KernelWarehouse(nn.Module):
    """n kernel cells of one shape, shared by every layer bound to it (`layers` names them, in model order)."""

    def __init__(self, num_cells: int, cell_shape: tuple[int, int, int, int], *, device=None, dtype=None):
        super().__init__()
        self.cells = nn.Parameter(torch.empty(num_cells, *cell_shape, device=device, dtype=dtype))
        self.layers: list[str] = []

    def extra_repr(self) -> str:
        return f"cells={self.cells.shape[0]}, cell_shape={tuple(self.cells.shape[1:])}, layers={len(self.layers)}"


class KernelWarehouses(nn.ModuleDict):
    """The model-level container (`model.kernel_warehouse`): warehouse name -> KernelWarehouse."""


@OPS.register("kernelwarehouse",
              help="KernelWarehouse: kernels assembled from cells of a warehouse shared per stage (ICML 2024)")
class KWConv2d(DynamicConvOp):
    """KernelWarehouse conv (regular, grouped, depthwise); see the module docstring."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, dilation=1, groups=1,
                 bias=False, cell_num_ratio: float = 1.0, cell_inplane_ratio: float = 1.0,
                 cell_outplane_ratio: float = 1.0, reduction: float = 0.0625, min_hidden: int = MIN_HIDDEN,
                 spatial_partition: bool = True, temperature: float = 0.0, warehouses: Mapping | None = None,
                 nonlocal_basis_ratio: float = 1.0, *, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.cell_num_ratio = _ratio(cell_num_ratio, "cell_num_ratio")
        for name, value in (("cell_inplane_ratio", cell_inplane_ratio), ("cell_outplane_ratio", cell_outplane_ratio)):
            if not 0 < float(value) <= 1:
                raise UserError(f"kernelwarehouse {name} must be in (0, 1] (a fraction of the channel gcd), got {value}")
        if not 0 < float(reduction) <= 1:
            raise UserError(f"kernelwarehouse reduction must be in (0, 1] (the paper's 1/16 = 0.0625), got {reduction}")
        if int(min_hidden) < 1:
            raise UserError(f"kernelwarehouse min_hidden must be >= 1, got {min_hidden}")
        _check_temperature(temperature)
        if float(nonlocal_basis_ratio) <= 0:
            raise UserError(f"kernelwarehouse nonlocal_basis_ratio must be > 0 (>= 1 = off; the 1/2x ResNet-50 row uses "
                            f"0.0625), got {nonlocal_basis_ratio}")
        self.nonlocal_basis_ratio = float(nonlocal_basis_ratio)
        self.cell_inplane_ratio, self.cell_outplane_ratio = float(cell_inplane_ratio), float(cell_outplane_ratio)
        self.reduction, self.min_hidden = float(reduction), int(min_hidden)
        self.spatial_partition = bool(spatial_partition)
        self.warehouses = _sharing_rules(warehouses)
        dd = dict(device=device, dtype=dtype)
        hidden = max(int(in_channels * self.reduction), self.min_hidden)
        self.fc = nn.Linear(in_channels, hidden, bias=False, **dd)
        self.bn = nn.BatchNorm1d(hidden, **dd)
        self.fc2: nn.Linear | None = None
        self.fc3: nn.Linear | None = None
        self.basis_bias: nn.Parameter | None = None
        self.bias = nn.Parameter(torch.empty(out_channels, **dd)) if bias else None
        self.register_buffer("temperature", torch.tensor(float(temperature), device=device))
        self._init_std: float | None = None
        self._shared: tuple[KernelWarehouse, ...] = ()
        cell = self.cell_shape_for([self.kernel_shape], self)
        n = assigned_cells(self.num_mixtures(cell), self.cell_num_ratio, 0)[1]
        self.warehouse = KernelWarehouse(n, cell, **dd)   # private until the surgery shares it
        self.bind(self.warehouse, 0)
        self.reset_parameters()

    # --- geometry ---
    def cell_shape_for(self, shapes: list[tuple[int, ...]], owner) -> tuple[int, int, int, int]:
        """The cell shape of a warehouse holding kernels of `shapes` (official `Warehouse_Manager.store`)."""
        out_gcd = math.gcd(*[s[0] for s in shapes])
        in_gcd = math.gcd(*[s[1] for s in shapes])
        c_o = max(int(out_gcd * self.cell_outplane_ratio), 1)
        c_i = max(int(in_gcd * self.cell_inplane_ratio), 1)
        if self.spatial_partition:
            spatial = (1, 1)
        else:
            sizes = sorted({tuple(s[2:]) for s in shapes})
            if len(sizes) > 1:
                raise UserError(f"kernelwarehouse: warehouse {owner} holds kernels of sizes "
                                f"{', '.join('x'.join(map(str, k)) for k in sizes)}; with spatial_partition=false every "
                                "layer of a warehouse needs the same kernel size (set spatial_partition=true for 1x1 "
                                "cells, or split the warehouse with op.kwargs.warehouses)")
            spatial = sizes[0]
        for s in shapes:
            if s[0] % c_o or s[1] % c_i:
                raise UserError(f"kernelwarehouse: cells of {c_o} output x {c_i} input channels do not tile a "
                                f"{s[0]}x{s[1]} kernel in warehouse {owner}; use cell_outplane_ratio / "
                                "cell_inplane_ratio that divide the channel gcd (1, 0.5, 0.25, ...)")
        return (c_o, c_i, *spatial)

    def num_mixtures(self, cell: tuple[int, int, int, int]) -> int:
        c_out, c_in, kh, kw = self.kernel_shape
        return (c_out // cell[0]) * (c_in // cell[1]) * (kh // cell[2]) * (kw // cell[3])

    # --- the warehouse binding (model-level sharing) ---
    def cells(self) -> Tensor:
        return (self._shared[0] if self._shared else self.warehouse).cells

    def bind(self, warehouse: KernelWarehouse, start: int) -> int:
        """Read kernels from `warehouse`, own cells from `start` on; (re)builds the attention's output layer
        and the assignment; returns the next free cell."""
        cell = tuple(warehouse.cells.shape[1:])
        n = warehouse.cells.shape[0]
        m = self.num_mixtures(cell)
        homes, end = assigned_cells(m, self.cell_num_ratio, start)
        if end > n:
            raise UserError(f"kernelwarehouse: warehouse with {n} cells cannot hold the layer's {m} mixtures from "
                            f"cell {start} on")
        dd = dict(device=warehouse.cells.device, dtype=warehouse.cells.dtype)
        self.cell_shape = cell
        self.mixture_grid = ((self.kernel_size[0] // cell[2]) * (self.kernel_size[1] // cell[3]),
                             self.out_channels // cell[0], self.in_channels // self.groups // cell[1])
        self.cell_range = (start, end)
        self.num_basis = None
        local = end - start
        if self.nonlocal_basis_ratio < 1.0 and n > local:  # other layers' cells through a basis (map_to_cell_basis)
            self.num_basis = max(int((n - local) * self.nonlocal_basis_ratio), MIN_BASIS)
            self.fc2 = nn.Linear(self.fc.out_features, m * (local + self.num_basis + 1), bias=False, **dd)
            self.fc3 = nn.Linear(self.num_basis, n - local, bias=False, **dd)
            self.basis_bias = nn.Parameter(torch.zeros(m * (n + 1), **dd))
        else:
            self.fc2 = nn.Linear(self.fc.out_features, m * (n + 1), **dd)
        assignment = torch.zeros(m, n + 1, **dd)
        for j, home in enumerate(homes):
            assignment[j, n if home is None else home] = 1.0
        self.register_buffer("assignment", assignment, persistent=False)
        if warehouse is not self._modules.get("warehouse"):
            self._modules.pop("warehouse", None)
            self._shared = (warehouse,)
            warehouse.layers.append(getattr(self, "_layer_name", "?"))
        return end

    # --- init ---
    def reset_parameters(self) -> None:
        """The official init: attention FCs kaiming-normal (fan_out, relu) with zero biases, BN 1/0, and the
        layer's own cells kaiming-normal (fan_out) on their (cells * c_o, c_i, s_h, s_w) view."""
        nn.init.kaiming_normal_(self.fc.weight, mode="fan_out", nonlinearity="relu")
        for fc in (self.fc2, self.fc3):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
                if fc.bias is not None:
                    nn.init.zeros_(fc.bias)
        if self.basis_bias is not None:
            nn.init.zeros_(self.basis_bias)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self.init_own_cells()

    def official_init_factor(self) -> float:
        """std of the official init of this layer's cells / std of a kaiming-normal(fan_out) init of the conv
        itself: the official rule draws the slice as one (cells * c_o, c_i, s_h, s_w) tensor, whose fan_out is
        cells * c_o * s_h * s_w instead of C_out * kh * kw (1 for a 1x layer whose cells span its input channels;
        1/sqrt(r) at r x; 1/2 for a 1x1 conv whose input is 4 cells wide)."""
        start, end = self.cell_range
        c_o, _, s_h, s_w = self.cell_shape
        return math.sqrt(self.out_channels * self.kernel_size[0] * self.kernel_size[1]
                         / max((end - start) * c_o * s_h * s_w, 1))

    def init_own_cells(self) -> None:
        """Draw this layer's slice of its warehouse by the official rule (kaiming-normal fan_out on the slice's
        view); after `init_like`, the same rule re-based on the replaced conv's measured std (equal to the official
        init on the kaiming-fan_out backbones the paper uses, and at the backbone's own scale on the others)."""
        start, end = self.cell_range
        if end <= start:
            return
        with torch.no_grad():
            own = self.cells()[start:end]
            if self._init_std is not None:
                own.normal_(0.0, self._init_std * self.official_init_factor())
            else:
                nn.init.kaiming_normal_(own.view(-1, *own.shape[2:]), mode="fan_out", nonlinearity="relu")

    def init_like(self, weight: Tensor, bias: Tensor | None = None) -> None:
        """Surgery: the layer's cells by the official rule at the replaced conv's scale (`init_own_cells`)."""
        self._init_std = kernel_std(weight)
        self.init_own_cells()
        if self.bias is not None:
            with torch.no_grad():
                if bias is None:
                    self.bias.zero_()
                else:
                    self.bias.copy_(bias)

    # --- temperature ---
    def set_temperature(self, t: float) -> None:
        _check_temperature(t)
        self.temperature.fill_(float(t))

    # --- the paper's math ---
    def attention(self, x: Tensor) -> Tensor:
        """alpha (B, m, n): each mixture's weights over the warehouse cells."""
        b, n = x.shape[0], self.assignment.shape[1]
        h = torch.relu(batch_norm(self.bn, self.fc(gap(x))))
        z = self.fc2(h).view(b, self.assignment.shape[0], -1)
        if self.fc3 is not None:
            start, end = self.cell_range
            local, basis, zero = z.split([end - start, self.num_basis, 1], dim=-1)
            others = self.fc3(basis)
            z = torch.cat([others[..., :start], local, others[..., start:], zero], dim=-1)
            z = z + self.basis_bias.view(1, -1, n)
        z = z / (z.abs().sum(dim=-1, keepdim=True) + NORM_EPS)
        t = self.temperature.to(z.dtype)
        z = (1.0 - t) * z + t * self.assignment.to(z.dtype)
        return z[..., :-1]

    def kernel(self, x: Tensor):
        alpha = self.attention(x)
        cells = self.cells()
        b = x.shape[0]
        mixed = torch.matmul(alpha, cells.reshape(cells.shape[0], -1).to(alpha.dtype))   # (B, m, cell numel)
        g_s, g_o, g_i = self.mixture_grid
        c_o, c_i, s_h, s_w = self.cell_shape
        w = mixed.view(b, g_s, g_o, g_i, c_o, c_i, s_h, s_w).permute(0, 2, 4, 3, 5, 1, 6, 7)
        w = w.reshape(b, *self.kernel_shape)
        return w, None if self.bias is None else self.bias.unsqueeze(0).expand(b, self.out_channels)

    # --- model-level sharing (called by the surgery) ---
    @classmethod
    def share_across_layers(cls, model: nn.Module, reports: list) -> None:
        """Group the replaced layers into warehouses, create them under `model.kernel_warehouse`, bind every
        layer to its slice in model order, and draw each layer's cells (see the module docstring)."""
        layers = {r.name: r for r in reports if r.replaced and isinstance(r.module, cls)}
        if not layers:
            return
        if hasattr(model, CONTAINER):
            raise UserError(f"the model already has a {CONTAINER!r}: kernelwarehouse surgery runs once per model")
        ordered = [(name, layers[name]) for name, _ in model.named_modules() if name in layers]
        groups: dict[str, list] = {}
        for name, r in ordered:
            groups.setdefault(r.module.warehouse_key(name, r), []).append((name, r))
        container = KernelWarehouses()
        for key, members in groups.items():
            first = members[0][1].module
            options = {(m.module.cell_num_ratio, m.module.cell_inplane_ratio, m.module.cell_outplane_ratio,
                        m.module.spatial_partition, m.module.nonlocal_basis_ratio) for _, m in members}
            if len(options) > 1:
                raise UserError(f"kernelwarehouse: the layers of warehouse {key!r} have different cell options "
                                f"{sorted(map(str, options))}; one warehouse needs one setting")
            cell = first.cell_shape_for([m.module.kernel_shape for _, m in members], repr(key))
            total = sum(assigned_cells(m.module.num_mixtures(cell), first.cell_num_ratio, 0)[1] for _, m in members)
            cells = first.cells()
            warehouse = KernelWarehouse(max(total, 1), cell, device=cells.device, dtype=cells.dtype)
            start = 0
            for name, r in members:
                r.module._layer_name = name
                start = r.module.bind(warehouse, start)
                r.module.reset_parameters()
                r.note = f"warehouse {key}"
            container[_safe_key(key)] = warehouse
        model.add_module(CONTAINER, container)

    def warehouse_key(self, name: str, report) -> str:
        """This layer's warehouse: the first `warehouses` rule whose regex matches its name, else its traced
        stage (depthwise convs apart: their 1-channel cells would shrink a shared warehouse's cells to 1)."""
        for key, pattern in self.warehouses:
            if pattern.search(name):
                return key
        depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
        return f"stage{report.stage if report.stage is not None else 'x'}" + ("_dw" if depthwise else "")

    def extra_repr(self) -> str:
        n = self.assignment.shape[1] - 1
        return (super().extra_repr() + f", cells={self.cell_range[1] - self.cell_range[0]}/{n}, "
                f"cell_shape={self.cell_shape}, mixtures={self.assignment.shape[0]}, "
                f"cell_num_ratio={self.cell_num_ratio}, temperature={float(self.temperature):g}")


def _check_temperature(t) -> None:
    if not 0.0 <= float(t) <= 1.0:
        raise UserError(f"kernelwarehouse temperature must be in [0, 1] (1 = each mixture its assigned cell, "
                        f"0 = pure attention), got {t}")


def _sharing_rules(warehouses) -> list[tuple[str, re.Pattern]]:
    if warehouses is None:
        return []
    if not isinstance(warehouses, Mapping):
        raise UserError("kernelwarehouse warehouses must be a mapping warehouse name -> regex over layer names, "
                        f"got {type(warehouses).__name__}")
    rules = []
    for key, pattern in warehouses.items():
        try:
            rules.append((str(key), re.compile(str(pattern))))
        except re.error as e:
            raise UserError(f"kernelwarehouse warehouses[{key!r}]: bad regex {pattern!r}: {e}") from None
    return rules


def _safe_key(key: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", key)


__all__ = ["KWConv2d", "KernelWarehouse", "KernelWarehouses", "assigned_cells"]
