"""KernelWarehouse dynamic convolution (Li & Yao, 2023): the convs of a stage assemble per-sample kernels from
one shared warehouse of small kernel cells.

Kernel partition. A kernel ``W`` of shape ``(out, in/groups, *k)`` (a Linear's ``(out, in)``: a 1x1 conv) is
cut into ``m`` disjoint cells ``(co, ci)`` (1x1 spatially), ``m = (out / co) (in/groups / ci) prod(k)``. The
cell channel sizes are the gcd of the out channels and of the in/groups channels of all layers sharing the warehouse,
times a cell ratio (1 for a budget b >= 1, 1/2 below; one for both or ``(out, in)``; precisely: the largest
divisor of the gcd not above gcd * ratio).

Warehouse sharing. The layers of a warehouse share ``n = int(b sum_l m_l)`` cells ``E``, so the cells hold b
times the static kernels' parameters. Each layer owns a contiguous block of about ``b m_l`` cells (the blocks
tile ``[0, n)``), Kaiming-normal initialised with that layer's own fan-out ``out prod(k)`` (the official code
takes the fan-out of its cells' view, ``m co``: the same when ``ci = in/groups``).

Attention, per layer and sample::

    z = FC2(ReLU(BN1d(FC1(GAP(x)))))        FC1: in -> max(in * reduction, 16), FC2: -> m (n + 1)
    z_i <- z_i / (sum_j |z_ij| + 1e-3)       per mixture i: a linear normalisation, values may be negative
    alpha = (1 - tau) z + tau beta          then slot n + 1 (the implicit zero cell) is dropped
    W_x = assemble(alpha @ E)               mixture i is cell i of the kernel, laid out in order

``beta`` is a fixed binary initial assignment. b >= 1: mixture i of a layer gets its own cell
``start + floor(i * block / m)`` (``start + b i`` for integer b). b < 1, r = int(1 / b): the mixtures with
``i % r == (i // r) % r`` (one in r, spread over in and out cells) get the block's cells in order, the others
the zero cell. ``tau`` decays linearly from 1 to 0 early in training (`TemperatureSchedule`). At ``tau = 1`` a
kernel is exactly its assigned cells: with b >= 1 and `KWConv.load_kernel` the conv starts as the static one.
With ``nonlocal_basis`` < 1 (official ResNet50 at 1/2x) FC2 outputs a layer's own cells directly and the other
layers' cells through a basis of ``max(nonlocal_basis * (n - block), 16)`` features and a linear map FC3.

Assembly and conv. The per-sample kernels ``(B, out, in/groups, *k)`` (one GEMM ``alpha @ E`` for the batch) are
applied, at batch B > 1, as: a 1x1 conv (no padding) by one ``bmm`` over the batch, ``y_b = W_b x_b`` on ``(B, in,
HW)`` (a channels-last input as ``(B, HW, in) @ W_b^T``, output channels-last), strided by subsampling; dense and
grouped kxk convs by one conv per sample at inference where a sample's conv is large (oneDNN runs the batch folded
into a large batch-sized group count slower), else and under autograd by one conv over the batch folded into the
groups (`KWConv._per_sample`); depthwise convs by one conv over the batch folded into the groups (input ``(1, B in,
*size)``, ``B groups`` groups: oneDNN's depthwise kernel), or one conv per sample when the input is channels-last
(folding would copy it to NCHW; the output stays channels-last). At batch 1 every conv is one conv with the
sample's kernel. A Linear (``kernel_size == ()``, input ``(B, ..., in)``, channels last) is one ``bmm`` over the
batch: the official KWLinear's 1x1 conv1d. All paths compute the official batch-folded grouped conv
up to float rounding (tests: <= 1e-6 relative). ONNX Conv's ``group`` is a constant, so while exporting
(`torch.onnx.export`, `torch.export`) a kxk conv is computed independently of the batch size: the padded
input is sliced per kernel tap (im2col) and multiplied with the kernels (MatMul). The bias, and an inference
BatchNorm after the conv folded into it (`KWConv.fold_affine`, by the `fold_bn` pass: ``y <- s y + (s b + t)``)
cost no extra pass where they can: the bias is added by the conv / bmm (``baddbmm``), the scale multiplies the
per-sample kernels (in their layout copy) where they are smaller than the output, else the conv's own fresh
output in place (without autograd).

`tau` is a buffer, saved in the state_dict (the official code keeps it in a plain attribute). The warehouse is
a submodule of the first conv that uses it (state_dict key ``<conv>.warehouse.cells``) and the others hold a
plain reference, so parameters() and state_dict() list it once. The attention's BatchNorm1d needs batches of
at least 2 samples in training mode.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfx.errors import LkfxError
from lkfx.graph.layout import memory_format_of

__all__ = ["KWConv", "TemperatureSchedule", "Warehouse", "WarehouseLayout", "attention_parameters",
           "convert_convs", "layout", "mark_interleaved", "set_temperature"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class WarehouseLayout:
    """Cell size, warehouse size and each layer's mixtures, block of cells and initial assignment."""

    cell_out: int
    cell_in: int
    n: int
    m: tuple[int, ...]  # mixtures (cells of the kernel) per layer
    start: tuple[int, ...]  # first cell of each layer's block
    size: tuple[int, ...]  # cells in each layer's block
    assigned: tuple[tuple[int | None, ...], ...]  # per layer and mixture: beta's cell, None = the zero cell


def _divisor_at_most(value: int, limit: float) -> int:
    return max((d for d in range(1, value + 1) if value % d == 0 and d <= limit), default=1)


def layout(shapes: Sequence[Sequence[int]], budget: float = 1.0,
           cell_ratio: float | tuple[float, float] | None = None) -> WarehouseLayout:
    """Plan the warehouse of the layers with kernel `shapes` ``(out, in/groups, *k)`` at parameter `budget`.

    `cell_ratio` scales the gcd channel sizes of the cells, one ratio for both or ``(out, in)`` (default 1
    for budget >= 1, 0.5 below). A Linear's ``(out, in)`` is a 1x1 conv's kernel without the 1s."""
    if not shapes:
        raise ValueError("a warehouse needs at least one layer")
    if not budget > 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    ratio = (1.0 if budget >= 1 else 0.5) if cell_ratio is None else cell_ratio
    r_out, r_in = ratio if isinstance(ratio, tuple) else (ratio, ratio)
    if not (0 < r_out <= 1 and 0 < r_in <= 1):
        raise ValueError(f"cell_ratio must be in (0, 1], got {ratio}")
    gcd_out, gcd_in = math.gcd(*(s[0] for s in shapes)), math.gcd(*(s[1] for s in shapes))
    co, ci = _divisor_at_most(gcd_out, gcd_out * r_out), _divisor_at_most(gcd_in, gcd_in * r_in)
    m = tuple(s[0] // co * (s[1] // ci) * math.prod(s[2:]) for s in shapes)
    n = int(budget * sum(m))
    if n < 1:
        raise ValueError(f"budget {budget} leaves no cell for {sum(m)} mixtures")
    # layer l owns cells floor(b M_{l-1}) .. floor(b M_l) - 1, with M_l = m_1 + ... + m_l
    bounds = [0, *(min(int(budget * c), n) for c in itertools.accumulate(m))]
    bounds[-1] = n
    start, size = tuple(bounds[:-1]), tuple(b - a for a, b in itertools.pairwise(bounds))
    assigned = []
    for ml, s0, q in zip(m, start, size, strict=True):
        if budget >= 1:
            assigned.append(tuple(s0 + i * q // ml for i in range(ml)))
        else:
            r = int(1 / budget)
            chosen = [i for i in range(ml) if i % r == (i // r) % r][:q]
            cell = {i: s0 + j for j, i in enumerate(chosen)}
            assigned.append(tuple(cell.get(i) for i in range(ml)))
    return WarehouseLayout(co, ci, n, m, start, size, tuple(assigned))


class Warehouse(nn.Module):
    """The ``n`` cells ``(n, co, ci)`` shared by the layers with kernel `shapes`; see `layout`."""

    def __init__(self, shapes: Sequence[Sequence[int]], budget: float = 1.0,
                 cell_ratio: float | tuple[float, float] | None = None):
        super().__init__()
        self.shapes = [tuple(int(v) for v in s) for s in shapes]
        self.budget = budget
        self.layout = layout(self.shapes, budget, cell_ratio)
        lay = self.layout
        self.cells = nn.Parameter(torch.empty(lay.n, lay.cell_out, lay.cell_in))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal (fan-out, ReLU gain) per layer block, with that layer's fan-out ``out prod(k)``."""
        with torch.no_grad():
            for shape, s0, q in zip(self.shapes, self.layout.start, self.layout.size, strict=True):
                self.cells[s0:s0 + q].normal_(0.0, math.sqrt(2.0 / (shape[0] * math.prod(shape[2:]))))

    def beta(self, index: int) -> torch.Tensor:
        """Layer `index`'s initial assignment ``(m, n + 1)``: one 1 per row; column n is the zero cell."""
        lay = self.layout
        beta = torch.zeros(lay.m[index], lay.n + 1)
        for i, cell in enumerate(lay.assigned[index]):
            beta[i, lay.n if cell is None else cell] = 1.0
        return beta

    def extra_repr(self) -> str:
        lay = self.layout
        return (f"layers={len(self.shapes)}, n={lay.n}, cell={lay.cell_out}x{lay.cell_in}, "
                f"budget={self.budget:g}")


def _attention_widths(in_channels: int, lay: WarehouseLayout, index: int, reduction: float,
                      nonlocal_basis: float) -> tuple[int, int]:
    """(hidden width, basis width or 0 without the nonlocal basis) of layer `index`'s attention."""
    others = lay.n - lay.size[index]
    basis = max(int(others * nonlocal_basis), 16) if nonlocal_basis < 1 and others > 0 else 0
    return max(int(in_channels * reduction), 16), basis


def attention_parameters(lay: WarehouseLayout, index: int, in_channels: int, reduction: float = 1 / 16,
                         nonlocal_basis: float = 1.0) -> int:
    """Parameters of layer `index`'s attention (FC1, BN1d, FC2, FC3 with the basis), from the layout alone."""
    hidden, basis = _attention_widths(in_channels, lay, index, reduction, nonlocal_basis)
    m, n, own = lay.m[index], lay.n, lay.size[index]
    fc2 = hidden * m * (own + basis + 1) + basis * (n - own) if basis else hidden * m * (n + 1)
    return in_channels * hidden + 2 * hidden + fc2 + m * (n + 1)


def _pieces(weight: torch.Tensor, cell_out: int, cell_in: int) -> torch.Tensor:
    """Cut a kernel ``(out, in_g, *k)`` into cells ``(m, co, ci)``, mixture order (tap, out cell, in cell)."""
    out, in_g, k = weight.shape[0], weight.shape[1], weight.shape[2:]
    w = weight.reshape(out // cell_out, cell_out, in_g // cell_in, cell_in, math.prod(k))
    return w.permute(4, 0, 2, 1, 3).reshape(-1, cell_out, cell_in)


def _padding(padding: Any, kernel: Sequence[int], dilation: Sequence[int]) -> tuple[int, ...]:
    if padding == "valid":
        return (0,) * len(kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' pads kernel {tuple(kernel)} with dilation {tuple(dilation)} "
                             "unevenly; give explicit padding")
        return tuple(t // 2 for t in total)
    return _ntuple(padding, len(kernel))


def _ntuple(value: Any, n: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * n


_BUFFERS = threading.local()
_PER_SAMPLE_MACS = 32_000_000  # see `KWConv._per_sample`


def _tracing() -> bool:
    """Compiling or exporting: the graph is traced, and allocates its own tensors."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def _inference() -> bool:
    """Eager inference outside inference_mode: the per-sample kernels are not kept for backward and may go to a
    reused buffer (inference tensors could not be written later outside inference_mode)."""
    return not (torch.is_grad_enabled() or torch.is_inference_mode_enabled() or _tracing())


def _bmm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` over the batch, plus `bias` (broadcast) in the same GEMM."""
    return torch.bmm(a, b, out=out) if bias is None else torch.baddbmm(bias, a, b, out=out)


def _interleaved(x: torch.Tensor) -> bool:
    """Whether the map ``(B, C, H, W)`` is batch-interleaved channels-last: memory ``(H, W, B, C)``, the layout of
    one ``(1, B C, H, W)`` channels-last map."""
    if x.dim() != 4 or x.shape[0] < 2:
        return False
    b, c, _, w = x.shape
    return x.stride() == (c, 1, w * b * c, b * c)


def _workspace(slot: int, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """A buffer of `shape` from this thread's reusable slot `slot`, grown as needed. Kernels of a batch are
    ``B`` times a layer's weights (ResNet-50, batch 8: up to 75 MB a layer); freshly allocated, every page of them
    faults on first write (~2 GB/s measured, against ~20 GB/s to memory already mapped)."""
    buffers = _BUFFERS.__dict__.setdefault("slots", {})
    key, numel = (slot, like.device, like.dtype), math.prod(shape)
    if key not in buffers or buffers[key].numel() < numel:
        buffers.pop(key, None)
        buffers[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buffers[key][:numel].view(shape)


class KWConv(nn.Module):
    """KernelWarehouse conv: layer `index` of `warehouse`, with a conv's stride / padding / dilation / groups.

    `owner`: register the warehouse as this module's submodule ``warehouse``; exactly one layer of each
    warehouse should, the others keep a plain reference."""

    def __init__(self, warehouse: Warehouse, index: int, *, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 reduction: float = 1 / 16, nonlocal_basis: float = 1.0, owner: bool = False):
        super().__init__()
        shape = warehouse.shapes[index]
        lay = warehouse.layout
        dims = len(shape) - 2
        self.index = index
        self.out_channels, self.in_channels = shape[0], shape[1] * groups
        self.kernel_size = shape[2:]
        self.stride, self.dilation = _ntuple(stride, dims), _ntuple(dilation, dims)
        self.padding = _padding(padding, self.kernel_size, self.dilation)
        self.groups, self.padding_mode = groups, padding_mode
        self._matmul_only = groups == 1 and all(k == 1 for k in self.kernel_size) and not any(self.padding)
        self.interleave_output = False  # see `mark_interleaved`
        self.m, self.n = lay.m[index], lay.n
        self._warehouse = (warehouse,)  # a plain reference: registered once, by the owner
        if owner:
            self.warehouse = warehouse
        hidden, basis = _attention_widths(self.in_channels, lay, index, reduction, nonlocal_basis)
        self.fc1 = nn.Linear(self.in_channels, hidden, bias=False)
        self.norm = nn.BatchNorm1d(hidden)
        self.local = (lay.start[index], lay.size[index])  # this layer's own block of cells
        if basis:
            self.fc2 = nn.Linear(hidden, self.m * (lay.size[index] + basis + 1), bias=False)
            self.fc3 = nn.Linear(basis, self.n - lay.size[index], bias=False)
            self.basis_bias = nn.Parameter(torch.zeros(self.m, self.n + 1))
        else:
            self.fc2 = nn.Linear(hidden, self.m * (self.n + 1))
            nn.init.zeros_(self.fc2.bias)
            self.fc3 = None
        for fc in (self.fc1, self.fc2, self.fc3):
            if fc is not None:
                nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None
        self.register_buffer("scale", None)  # per output channel, from `fold_affine`
        self.register_buffer("beta", warehouse.beta(index), persistent=False)
        self.register_buffer("tau", torch.ones(()))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """alpha ``(B, m, n)``: the normalised FC output mixed with beta by tau, zero-cell slot dropped."""
        pooled = x.flatten(2).mean(-1) if self.kernel_size else x.reshape(x.shape[0], -1, x.shape[-1]).mean(1)
        z = self.fc2(F.relu(self.norm(self.fc1(pooled))))
        if self.fc3 is None:
            z = z.reshape(-1, self.m, self.n + 1)
        else:  # the other layers' cells through the basis
            start, size = self.local
            z = z.reshape(-1, self.m, z.shape[-1] // self.m)
            other = self.fc3(z[..., size:-1])
            z = torch.cat([other[..., :start], z[..., :size], other[..., start:], z[..., -1:]], -1)
            z = z + self.basis_bias
        z = z / (z.abs().sum(-1, keepdim=True) + 1e-3)
        return ((1.0 - self.tau) * z + self.tau * self.beta)[..., :-1]

    def kernels(self, x: torch.Tensor, *, workspace: bool = False, scale: torch.Tensor | None = None,
                channels_last: bool | None = None) -> torch.Tensor:
        """Per-sample kernels ``(B, out, in/groups, *k)`` for the batch `x`, each output channel times `scale` if
        given; each sample's kernel channels-last (memory ``(out, *k, in/groups)``) for a 2-D conv if
        `channels_last` (default: when `x` is a channels-last map), as oneDNN takes it with such a map (a contiguous
        kernel would be copied per sample first: ResNet50's 7 x 7 convs at batch 8 run 2x slower). With
        `workspace` (inference only) they are written into this thread's reusable buffers (`_workspace`), valid
        until the next KWConv call."""
        wh = self._warehouse[0]
        co, ci = wh.layout.cell_out, wh.layout.cell_in
        in_g = self.in_channels // self.groups
        alpha, cells = self.attention(x), wh.cells.reshape(self.n, co * ci)
        if workspace:
            w = torch.matmul(alpha, cells, out=_workspace(0, (*alpha.shape[:2], co * ci), cells))
        else:
            w = alpha @ cells  # (B, m, co ci)
        w = w.reshape(-1, math.prod(self.kernel_size), self.out_channels // co, in_g // ci, co, ci)
        if channels_last is None:
            channels_last = memory_format_of(x) == torch.channels_last
        channels_last = channels_last and len(self.kernel_size) == 2
        # (B, out cells, co, taps, in cells, ci) channels-last, else (B, out cells, co, in cells, ci, taps)
        w = w.permute(0, 2, 4, 1, 3, 5) if channels_last else w.permute(0, 2, 4, 3, 5, 1)
        s = None if scale is None else scale.reshape(1, -1, co, 1, 1, 1)
        if workspace and (s is not None or not w.is_contiguous()):  # the scale rides on the layout copy
            buffer = _workspace(1, w.shape, cells)
            w = buffer.copy_(w) if s is None else torch.mul(w, s, out=buffer)
        else:
            w = (w if s is None else w * s).contiguous()
        if channels_last:
            return w.view(-1, self.out_channels, *self.kernel_size, in_g).permute(0, 1, 4, 2, 3)
        return w.view(-1, self.out_channels, in_g, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        matmul = self._matmul_only and (x.shape[0] > 1 or not self.kernel_size)  # batch 1: oneDNN's 1x1 conv
        per_sample = not matmul and x.shape[0] > 1 and self._per_sample(x)
        # a folded affine map's scale enters the per-sample kernels where they are smaller than the output (1x1
        # convs on large maps, depthwise convs), else the output; the bias goes into the conv / bmm
        scale_kernels = self.scale is not None and \
            self.in_channels // self.groups * math.prod(self.kernel_size) <= self._positions(x)
        # channels-last kernels where the conv runs on the channels-last map itself (not batch-folded to NCHW)
        channels_last = len(self.kernel_size) == 2 and memory_format_of(x) == torch.channels_last and (
            x.shape[0] == 1 or per_sample)
        w = self.kernels(x, workspace=_inference(), scale=self.scale if scale_kernels else None,
                         channels_last=channels_last)
        bias = self.bias if self.scale is None or scale_kernels else None
        y = self._batched_matmul(x, w, bias) if matmul else self._conv(x, w, bias, per_sample)
        if self.scale is None or scale_kernels:
            return y
        # y is this call's own fresh tensor: without autograd the epilogue writes it in place (a new tensor of
        # a large map costs page faults: MobileNetV2's 8 x 96 x 112 x 112 is 3x slower to allocate than to scale)
        out = y if not (y.requires_grad or _tracing()) else None
        return torch.addcmul(self._per_channel(self.bias), y, self._per_channel(self.scale), out=out)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *(1,) * len(self.kernel_size))

    def _positions(self, x: torch.Tensor) -> int:
        """Output positions per sample: the conv's output pixels, or a Linear's rows."""
        if not self.kernel_size:
            return x[0].numel() // x.shape[-1]
        return math.prod((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
                         zip(x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True))

    @torch.no_grad()
    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Follow this conv by ``y <- scale * y + shift`` per output channel (an inference BatchNorm: the
        `fold_bn` pass): ``y <- s conv(x, W) + (s b + t)``. The cells are shared with other layers, so the scale
        cannot enter them; it multiplies the per-sample kernels where they are smaller than the output (B times
        the layer's weights against B times the output map), else the output, in place at inference. Computed in
        `scale`'s dtype (float64 from `fold_bn`), stored in the cells'."""
        dtype = self._warehouse[0].cells.dtype
        s = scale.reshape(-1)
        old_scale = torch.ones_like(s) if self.scale is None else self.scale.to(s)
        bias = torch.zeros_like(s) if self.bias is None else self.bias.to(s)
        self.scale = (old_scale * s).to(dtype)
        self.bias = nn.Parameter((bias * s + shift.reshape(-1).to(s)).to(dtype),
                                 requires_grad=self.bias is None or self.bias.requires_grad)

    def _batched_matmul(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """A Linear over the last dim, or a 1x1 conv (stride by subsampling), as one ``bmm`` over the batch:
        ``y_b = W_b x_b (+ bias)``. Channels-last maps are multiplied as ``(B, HW, in) @ W_b^T`` and stay
        channels-last."""
        w = w.reshape(-1, self.out_channels, self.in_channels)
        if not self.kernel_size:
            rows = x.unsqueeze(1) if x.dim() == 2 else x.flatten(1, -2)
            return _bmm(rows, w.transpose(1, 2), bias).reshape(*x.shape[:-1], self.out_channels)
        if any(s > 1 for s in self.stride):
            x = x[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))]
        size = x.shape[2:]
        if x.dim() == 4 and (x.is_contiguous(memory_format=torch.channels_last) or _interleaved(x)):
            rows = x.permute(0, 2, 3, 1).flatten(1, 2)  # (B, HW, in), rows B in apart when interleaved
            if self.interleave_output and not (torch.is_grad_enabled() or _tracing()):
                y = torch.empty(math.prod(size), x.shape[0], self.out_channels, dtype=w.dtype, device=w.device)
                _bmm(rows, w.transpose(1, 2), bias, out=y.transpose(0, 1))
                return y.view(*size, x.shape[0], self.out_channels).permute(2, 3, 0, 1)
            y = _bmm(rows, w.transpose(1, 2), bias)
            return y.reshape(-1, *size, self.out_channels).permute(0, 3, 1, 2)
        return _bmm(w, x.flatten(2), None if bias is None else bias.unsqueeze(-1)).reshape(-1, self.out_channels, *size)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, per_sample: bool) -> torch.Tensor:
        """The conv of `x` with the per-sample kernels `w`: one conv per sample if `per_sample` (`_per_sample`),
        else one over the batch folded into the groups (depthwise maps laid out batch-interleaved: one conv)."""
        pad = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, [p for p in reversed(pad) for _ in range(2)], mode=self.padding_mode)
            pad = (0,) * len(pad)
        if torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting():
            y = self._per_sample_conv(x, w, pad)
            return y if bias is None else y + self._per_channel(bias)
        b, conv = x.shape[0], _CONV[len(self.kernel_size)]
        if self.groups == self.in_channels and _interleaved(x):
            return self._interleaved_depthwise(x, w, bias, pad)
        if per_sample:
            return torch.cat([conv(x[i:i + 1], w[i], bias, self.stride, pad, self.dilation, self.groups)
                              for i in range(b)])
        y = conv(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None if bias is None else bias.repeat(b),
                 self.stride, pad, self.dilation, self.groups * b)
        return y.reshape(b, self.out_channels, *y.shape[2:])

    def _per_sample(self, x: torch.Tensor) -> bool:
        """One conv per sample, rather than one conv over the batch folded into the groups: depthwise convs on
        channels-last maps (folding would copy the map to NCHW; oneDNN's channels-last depthwise conv is 1.5-5x
        faster than its NCHW one on MobileNetV2's 112 x 112 and 56 x 56 layers); dense and grouped convs at
        inference when a sample's conv has at least `_PER_SAMPLE_MACS` multiply-adds (oneDNN runs a large
        batch-sized group count up to 2.6x slower: ResNet's 512-channel 7 x 7 convs; on small maps the calls'
        overhead outweighs that). With autograd the folded conv's one backward beats B of them (1-2x, measured
        on ResNet and CIFAR-sized convs)."""
        if self.in_channels == self.groups:
            return memory_format_of(x) == torch.channels_last
        if torch.is_grad_enabled():
            return False
        macs = self.out_channels * self.in_channels // self.groups * math.prod(self.kernel_size) * self._positions(x)
        return macs >= _PER_SAMPLE_MACS

    def _interleaved_depthwise(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                               pad: tuple[int, ...]) -> torch.Tensor:
        """A depthwise conv of a batch-interleaved map: one channels-last conv of ``(1, B in, H, W)`` with ``B in``
        groups (oneDNN's channels-last depthwise kernel, no copy), output batch-interleaved too (channels-last if
        this conv does not `interleave_output`)."""
        b, c, h, wd = x.shape
        y = F.conv2d(x.as_strided((1, b * c, h, wd), (h * wd * b * c, 1, wd * b * c, b * c)),
                     w.reshape(-1, *w.shape[2:]), None if bias is None else bias.repeat(b), self.stride, pad,
                     self.dilation, b * c).contiguous(memory_format=torch.channels_last)
        ho, wo, oc = y.shape[2], y.shape[3], self.out_channels
        y = y.as_strided((b, oc, ho, wo), (oc, 1, wo * b * oc, b * oc))
        return y if self.interleave_output else y.contiguous(memory_format=torch.channels_last)

    def _per_sample_conv(self, x: torch.Tensor, w: torch.Tensor, pad: tuple[int, ...]) -> torch.Tensor:
        """The batch-folded grouped conv without a batch-sized group count: im2col by slicing, then MatMul."""
        x = F.pad(x, [p for p in reversed(pad) for _ in range(2)])
        out = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in
               zip(x.shape[2:], self.kernel_size, self.stride, self.dilation, strict=True)]
        taps = []
        for offsets in itertools.product(*(range(k) for k in self.kernel_size)):
            index = [slice(None), slice(None)]
            for o, d, s, n in zip(offsets, self.dilation, self.stride, out, strict=True):
                index.append(slice(o * d, o * d + (n - 1) * s + 1, s))
            taps.append(x[tuple(index)])
        g, rows = self.groups, self.in_channels // self.groups * math.prod(self.kernel_size)
        cols = torch.stack(taps, 2).reshape(-1, g, rows, math.prod(out))  # (B, g, in_g taps, pixels)
        w = w.reshape(-1, g, self.out_channels // g, rows)
        return (w @ cols).reshape(-1, self.out_channels, *out)

    @torch.no_grad()
    def load_kernel(self, weight: torch.Tensor) -> None:
        """Write a static kernel's cells into the cells beta assigns to this layer's mixtures: at ``tau = 1``
        (with b >= 1, where every mixture has a cell) this conv then computes the static conv."""
        wh = self._warehouse[0]
        pieces = _pieces(weight.detach().to(wh.cells), wh.layout.cell_out, wh.layout.cell_in)
        pairs = [(i, cell) for i, cell in enumerate(wh.layout.assigned[self.index]) if cell is not None]
        mixtures, cells = zip(*pairs, strict=True) if pairs else ((), ())
        wh.cells[list(cells)] = pieces[list(mixtures)].reshape(-1, *wh.cells.shape[1:])

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"groups={self.groups}, m={self.m}, n={self.n}, bias={self.bias is not None}"
                + (", scale=True" if self.scale is not None else ""))


def convert_convs(convs: Sequence[Any], budget: float = 1.0,
                  cell_ratio: float | tuple[float, float] | None = None, reduction: float = 1 / 16,
                  nonlocal_basis: float = 1.0) -> list[KWConv]:
    """KernelWarehouse versions of `convs` sharing one new warehouse, owned by the first. `convs` are
    nn.ConvNd or nn.Linear modules, or anything with their weight / bias (and a conv's stride / padding /
    dilation / groups / padding_mode) attributes; a Linear becomes a KWConv over its input's last dim.

    Each keeps its conv's geometry and bias; its kernel is loaded into the cells beta assigns it
    (`KWConv.load_kernel`), the rest of its block keeps the Kaiming initialisation."""
    wh = Warehouse([tuple(c.weight.shape) for c in convs], budget, cell_ratio).to(convs[0].weight)
    out = []
    for i, c in enumerate(convs):
        kw = KWConv(wh, i, stride=getattr(c, "stride", 1), padding=getattr(c, "padding", 0),
                    dilation=getattr(c, "dilation", 1), groups=getattr(c, "groups", 1),
                    bias=c.bias is not None, padding_mode=getattr(c, "padding_mode", "zeros"), reduction=reduction,
                    nonlocal_basis=nonlocal_basis, owner=i == 0).to(c.weight)
        kw.load_kernel(c.weight)
        if c.bias is not None:
            with torch.no_grad():
                kw.bias.copy_(c.bias)
        out.append(kw)
    return out


# single-input elementwise modules a batch-interleaved map may pass through (BatchNorm may not: its CPU kernel
# is ~10x slower on it; `fold_bn` removes the ones after KW convs)
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.LeakyReLU,
                nn.Sigmoid, nn.Mish, nn.ELU, nn.Identity)


def mark_interleaved(gm: torch.fx.GraphModule) -> int:
    """Set `KWConv.interleave_output` on each 2-D 1x1 or depthwise KWConv of `gm` whose output reaches, through
    elementwise activations only, nothing but 1x1 and depthwise KWConvs (an inverted residual block's expand ->
    depthwise -> project chain, once its BatchNorms are folded); clear it on the others. Returns how many are set.

    Such a conv hands its output on batch-interleaved (memory ``(H, W, B, C)``, `_interleaved`), at batch > 1
    without autograd, where its input is channels-last or interleaved: a 1x1 conv writes it in its bmm at no
    cost, and a depthwise conv then runs the whole batch as one channels-last conv of ``(1, B C, H, W)``
    (`_interleaved_depthwise`) instead of one conv per sample and a concatenation. Only the layout changes."""
    modules = dict(gm.named_modules())

    def chainable(m: Any) -> bool:
        return isinstance(m, KWConv) and len(m.kernel_size) == 2 and (m._matmul_only or m.groups == m.in_channels)

    def readers_take(node: torch.fx.Node) -> bool:
        for user in node.users:
            m = modules.get(user.target) if user.op == "call_module" else None
            through = isinstance(m, _ELEMENTWISE) and len(user.args) == 1 and not user.kwargs
            if not (through and readers_take(user) or chainable(m) and user.args[:1] == (node,)):
                return False
        return bool(node.users)

    verdicts: dict[str, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and chainable(modules.get(node.target)):
            verdicts[node.target] = verdicts.get(node.target, True) and readers_take(node)
    for name, verdict in verdicts.items():
        modules[name].interleave_output = verdict
    return sum(verdicts.values())


def set_temperature(model: nn.Module, tau: float) -> int:
    """Set the attention temperature of every `KWConv` in `model`; returns how many there are."""
    count = 0
    for m in model.modules():
        if isinstance(m, KWConv):
            m.tau.fill_(tau)
            count += 1
    if not count:
        raise LkfxError(f"{type(model).__name__} has no KernelWarehouse convs; apply the 'kernel_warehouse' "
                        "pass first and set the temperature on the model it returns")
    return count


class TemperatureSchedule:
    """Linear temperature decay ``start -> end`` over the first `epochs` epochs, updated every iteration.

        schedule = TemperatureSchedule(model, epochs=20, steps_per_epoch=len(loader))
        for epoch in range(300):
            for x, y in loader:
                schedule.step()      # this iteration's tau; then train as usual

    Iteration t (1-based, counted by `step`) gets ``end + (start - end) max(0, 1 - t / (epochs steps))``, as
    in the official training loop. `state_dict` / `load_state_dict` resume it."""

    def __init__(self, model: nn.Module, epochs: float, steps_per_epoch: int, start: float = 1.0,
                 end: float = 0.0):
        if epochs < 0 or steps_per_epoch < 1:
            raise ValueError(f"need epochs >= 0 and steps_per_epoch >= 1, got {epochs} and {steps_per_epoch}")
        self.model, self.start, self.end = model, start, end
        self.total = epochs * steps_per_epoch
        self.steps = 0
        self.tau = start
        set_temperature(model, start)

    def step(self) -> float:
        self.steps += 1
        self.tau = self.end + (self.start - self.end) * max(0.0, 1.0 - self.steps / max(self.total, 1))
        set_temperature(self.model, self.tau)
        return self.tau

    def state_dict(self) -> dict[str, float]:
        return {"steps": self.steps, "tau": self.tau}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.steps, self.tau = int(state["steps"]), float(state["tau"])
        set_temperature(self.model, self.tau)
