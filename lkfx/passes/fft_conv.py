"""fft_conv: compute large and global convs by zero-padded FFT, exactly the same linear convolution.

A stride-1 conv whose kernel is large compared to the feature map costs ``K^2`` MACs per output directly and
``O(log(HW))`` per output by FFT. Computed at the feature-map size (GFNet) the FFT gives a *circular*
convolution, wrong at the borders; padded to an ``N x M`` grid with ``N >= H + max(pad_top, pad_bottom)``
(kernel taps that never reach the input cropped first) and cropped back it is the conv itself (math in
`lkfx.backends.fft_cost` and `lkfx.modules.fft_conv`)::

    x ── Conv(W, b, 'same') ── y        becomes        x ── FFTConv2d(W, b) ── y                      (torch.fx)
    x ── aten.convolution(x, W, b) ── y  becomes   x ── fft_conv2d(x, W, b) ── y          (ATen graphs)

    x ── Conv ── y      becomes      x ─ Unsqueeze ─ DFT(W axis, onesided) ─ DFT(H axis, N) ─┐          (ONNX)
                                     W ─ DFT ─ DFT ─ * phase ─ (constant-folded) ─────────── * conj ─┐
                        y ── + b ── Squeeze ── Slice ── IDFT(W axis, M) ── Slice ── IDFT(H axis) ────┘

Which convs: 2-D, stride 1, dilation 1, zero padding that is 'same' (``pad_begin + pad_end = k - 1`` on both
axes, e.g. ``padding='same'`` or ``(k - 1) / 2``) or 0, dense (``groups=1``) or depthwise (one input channel per
group, any channel multiplier), constant floating-point weight. Others are refused with the reason.
``min_kernel=None`` (default) selects global convs, whose kernel covers the feature map on both axes (that needs
the feature-map size: give ``example_inputs``); an int selects kernels with a side of at least that.

ATen graphs (``aten.convolution`` nodes, e.g. in the torch.compile backend `lkfx.backends.dynamo`) get the
functional `lkfx.modules.fft_conv.fft_conv2d` instead of a module: its weight and bias may be any tensor, graph
inputs included (only their shapes, from the node's ``val`` / ``tensor_meta``, are read), the kernel spectrum is
computed in the graph and gradients reach W and b, so the rewrite is valid for training.

``mode='auto'`` (default) asks `lkfx.backends.fft_cost.CostModel`, calibrated once per machine and cached, for the
time of each selected conv at the example batch size in each of three ways: NCHW direct, channels-last direct
(oneDNN, no large-kernel cliff) and FFT; the FFT must be predicted at least 1.25x faster than the better direct
layout (its prediction is the optimistic one); kernels below 5x5 never take it. Layout is planned per run of
layout-agnostic ops (convs, BN, activations, pooling, adds: `lkfx.graph.layout`), not per conv: a run whose large
convs with the conversions at its edges cost less channels-last than NCHW is converted to channels-last once on the
way in and back once on the way out; a conv alone in its run that is cheaper in the other layout even with its own
two conversions gets them (also NCHW inside a channels-last model). Tensors already channels-last in the example run
are not converted, so a channels-last model keeps its layout. In ATen graphs (the torch.compile backend) inductor
lays tensors out itself, channels-last for CPU convs: there the direct candidates are priced with channels-last
neighbours and only the FFT is a rewrite. ``mode='always'`` rewrites every selected conv to FFT. Each conv's chosen
candidate and every candidate's predicted time go in the report (rewritten convs as notes, convs kept as they are as
skips).

ONNX: the DFT subgraph needs opset 20 (DFT with its axis as an input); older models are refused with the
command to convert them. The transforms are power-of-2 long: onnxruntime's CPU DFT is a naive O(N^2) loop for
other lengths. The inverse along the last axis is a complex DFT of the one-sided spectrum, zero-padded, with the
Hermitian weights (1, 2, ..., 2, 1) folded into the kernel spectrum: real part = irfft, without DFT's newer
``onesided=1, inverse=1`` mode that older runtimes lack. The kernel spectrum is computed in the graph from the
original weight (so the file does not grow by the spectrum's size); runtimes constant-fold it at load.
Runtimes: onnxruntime runs DFT on the CPU (checked by the tests); its CUDA provider has no DFT kernel and falls
back to the CPU; TensorRT had no DFT before 11.2 (11.2 adds it through a cuFFT plugin); OpenVINO and TVM import
it. lkfx has no cost model for those runtimes, and onnxruntime's own CPU Conv is fast for large depthwise
kernels: measured on one thread, batch 8, 64 channels, the subgraph ties with it at 56x56 / 31x31 (55 vs 54 ms)
and is 15-65x slower on small maps (14x14 / 27x27: 21 vs 1.5 ms; 7x7 / 13x13: 5.8 vs 0.09 ms). So
``mode='auto'`` leaves ONNX convs alone with that reason: use ``mode='always'`` for a runtime with a fast DFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lkfx.errors import LkfxError
from lkfx.passes import Pass, PassContext, register_pass

ONNX_MIN_OPSET = 20
ONNX_AUTO_REASON = ("mode='auto' has no cost model for ONNX runtimes (on onnxruntime's CPU the DFT subgraph is at "
                    "best as fast as its Conv); use mode='always' to rewrite for a runtime with a fast DFT")


def _kernel_text(kernel) -> str:
    return "x".join(str(int(k)) for k in kernel)


def _padding_refusal(pads, kernel) -> str | None:
    """None for 'same'-style (begin + end = k - 1 on every axis) or zero padding, else the reason."""
    if all(p == (0, 0) for p in pads) or all(b + e == k - 1 for (b, e), k in zip(pads, kernel, strict=True)):
        return None
    return (f"padding {[list(p) for p in pads]} (begin, end per axis) is neither 'same' (sum k - 1 per axis) "
            "nor 0")


@register_pass
class FFTConv(Pass):
    name = "fft_conv"
    summary = "Compute large / global convs by zero-padded FFT (exact linear conv), where a cost model says it pays."
    options = {"min_kernel": None, "mode": "auto"}

    def __init__(self, **options: Any):
        super().__init__(**options)
        k = self.config["min_kernel"]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise LkfxError(f"option 'min_kernel' of pass '{self.name}' must be None (global convs) or an int >= 1, "
                            f"got {k!r}")
        if self.config["mode"] not in ("auto", "always"):
            raise LkfxError(f"option 'mode' of pass '{self.name}' must be 'auto' or 'always', "
                            f"got {self.config['mode']!r}")

    def _selection_refusal(self, kernel, in_size) -> str | None:
        """Whether `min_kernel` selects this conv; `in_size` is None when unknown."""
        k = self.config["min_kernel"]
        if k is None:
            if in_size is None:
                return ("the feature-map size is unknown: min_kernel=None selects global convs (kernel >= map), "
                        "which needs example_inputs; or set min_kernel")
            if any(kk < n for kk, n in zip(kernel, in_size, strict=True)):
                return (f"kernel {_kernel_text(kernel)} does not cover the {_kernel_text(in_size)} feature map "
                        "(min_kernel=None rewrites global convs only; set min_kernel to select by size)")
            return None
        return None if max(kernel) >= k else f"kernel {_kernel_text(kernel)} is below min_kernel={k}"

    # --- torch.fx -----------------------------------------------------------------------------------
    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from lkfx.modules.fft_conv import FFTConv2d

        return (FFTConv2d,)

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        import torch

        from lkfx.backends.fft_cost import ConvShape, fft_plan
        from lkfx.graph.fx import propagate_shapes
        from lkfx.modules.fft_conv import FFTConv2d, conv_pads
        from lkfx.patterns.fx import FxView

        if ctx.example_inputs is not None:
            propagate_shapes(gm, ctx.example_inputs)
        view = FxView(gm)
        report = ctx.report
        selected = []  # (node, info, where, shape or None, FFT grid text or None)
        for node in view.candidates(frozenset(["conv"])):
            report.matched += 1
            where = view.describe(node)
            computed = view.computed_conv_args(node)
            if computed:
                report.skip(where, f"its {', '.join(computed)} computed in the graph")
                continue
            info = view.conv(node)
            functional = isinstance(node.target, torch._ops.OpOverload)
            weight = info.weight
            if weight is None and functional:
                weight = _meta_value(view.arg(node, "weight"))
            reason = self._fx_refusal(view, info, weight, functional)
            if reason is None:
                kernel = tuple(weight.shape[2:])
                pads = conv_pads(info.padding, kernel)
                reason = _padding_refusal(pads, kernel)
            if reason:
                report.skip(where, reason)
                continue
            x = node.args[0] if node.op == "call_module" else view.arg(node, "input")
            meta = x.meta.get("tensor_meta")
            in_shape = tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
            in_size = in_shape[2:] if in_shape is not None and len(in_shape) == 4 else None
            reason = self._selection_refusal(kernel, in_size)
            if reason is None and self.config["mode"] == "auto" and in_size is None:
                reason = ("mode='auto' needs the feature-map size for the cost model: give example_inputs (or use "
                          "mode='always')")
            if reason:
                report.skip(where, reason)
                continue
            shape = None if in_size is None else ConvShape(
                in_shape[0], in_shape[1], weight.shape[0], info.groups, in_size, kernel, pads,
                getattr(meta, "memory_format", None) == torch.channels_last)
            grid = _kernel_text(fft_plan(in_size, kernel, pads).size) if in_size is not None else None
            selected.append(_Selected(node, info, where, kernel, shape, grid, weight.device.type))
        if self.config["mode"] == "auto":
            choices = _plan(gm, selected, report, aten=any(isinstance(c.node.target, torch._ops.OpOverload)
                                                          for c in selected))
        else:
            choices = {c.node: "fft" for c in selected}
        for c in selected:
            if self.config["mode"] == "always":
                on = f" on {_kernel_text(c.shape.in_size)} -> FFT {c.grid}" if c.shape else " -> FFT"
                report.note(f"{c.where}: {_kernel_text(c.kernel)} kernel{on} (mode='always')")
            if choices[c.node] == "kept":
                continue
            report.rewritten += 1
            if choices[c.node] != "fft":
                continue
            if isinstance(c.node.target, torch._ops.OpOverload):
                _fx_functional(gm, c.node, view, c.info.padding, c.info.groups)
            else:
                module = FFTConv2d(c.info.weight, c.info.bias, c.info.padding, c.info.groups)
                module.train(c.info.module.training if c.info.module is not None else gm.training)
                view.swap(c.node, module, "fft")
        return view.finish() if report.modified else gm

    def _fx_refusal(self, view: Any, info: Any, w: Any, functional: bool) -> str | None:
        """`w`: the weight, or for ATen nodes the value of whatever feeds it (None when unknown)."""
        if w is None:
            return ("the weight's shape is unknown (no val / tensor_meta on the node feeding it)" if functional
                    else "the weight is computed in the graph, not a parameter")
        if w.ndim != 4:
            return f"only 2-D convs are computed by FFT, this one is {w.ndim - 2}-D"
        if not w.is_floating_point():
            return f"the weight is {w.dtype}, not floating point"
        if not functional and view.bias_is_computed(info):
            return "the bias is computed in the graph, not a parameter"
        if info.stride != (1, 1):
            return f"stride {info.stride}: the FFT computes stride-1 convs only"
        if info.dilation != (1, 1):
            return f"dilation {info.dilation}: only dilation 1"
        if info.padding_mode != "zeros":
            return f"padding mode '{info.padding_mode}': only zero padding is a linear conv of the zero-extended map"
        if info.groups != 1 and w.shape[1] != 1:
            return (f"groups={info.groups} with {w.shape[1]} input channels per group: only dense (groups=1) or "
                    "depthwise convs")
        return None

    # --- ONNX ---------------------------------------------------------------------------------------
    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from lkfx.backends.fft_cost import ONNX_RADICES, fft_plan
        from lkfx.patterns.onnx import OnnxView, onnx_pads

        view = OnnxView(graph)
        report = ctx.report
        convs = view.candidates(frozenset(["Conv"]))
        shapes = _OnnxShapes(graph)
        in_shapes = {id(conv): shapes.of(conv.inputs[0]) for conv in convs}  # before any rewrite
        for conv in convs:
            report.matched += 1
            where = view.describe(conv)
            w = view.const(conv.inputs[1])
            reason = self._onnx_refusal(graph, conv, w)
            if reason is None:
                kernel = tuple(w.shape[2:])
                pads = onnx_pads(conv, kernel)
                reason = _padding_refusal(pads, kernel)
            if reason is None:
                in_shape = in_shapes[id(conv)]
                if in_shape is None or len(in_shape) != 4 or not all(isinstance(d, int) for d in in_shape[1:]):
                    reason = (f"the input's channel and spatial sizes are not static ({in_shape}); export with a "
                              "fixed H and W (or run onnx shape inference)")
            if reason is None:
                reason = self._selection_refusal(kernel, tuple(in_shape[2:]))
            if reason is None and self.config["mode"] == "auto":
                reason = ONNX_AUTO_REASON
            if reason:
                report.skip(where, reason)
                continue
            plan = fft_plan(tuple(in_shape[2:]), kernel, pads, ONNX_RADICES)
            _onnx_fft_subgraph(graph, view, conv, w.shape, plan)
            report.note(f"{where}: {_kernel_text(kernel)} kernel on {_kernel_text(in_shape[2:])} -> DFT "
                        f"{_kernel_text(plan.size)} (mode='always')")
            report.rewritten += 1
        if report.modified:
            graph.cleanup().toposort()

    def _onnx_refusal(self, graph: Any, conv: Any, w: np.ndarray | None) -> str | None:
        if graph.opset < ONNX_MIN_OPSET:
            return (f"the model's opset {graph.opset} is below {ONNX_MIN_OPSET}, which the DFT subgraph needs; "
                    f"convert it first: onnx.version_converter.convert_version(model, {ONNX_MIN_OPSET})")
        if w is None:
            return "the weight is not a constant"
        if w.ndim != 4:
            return f"only 2-D convs are computed by FFT, this one is {w.ndim - 2}-D"
        if w.dtype != np.float32:
            return f"the weight is {w.dtype}; the DFT subgraph is built in float32"
        if any(int(s) != 1 for s in conv.attrs.get("strides", [1, 1])):
            return f"strides {list(conv.attrs['strides'])}: the FFT computes stride-1 convs only"
        if any(int(d) != 1 for d in conv.attrs.get("dilations", [1, 1])):
            return f"dilations {list(conv.attrs['dilations'])}: only dilation 1"
        group = int(conv.attrs.get("group", 1))
        if group != 1 and w.shape[1] != 1:
            return f"group={group} with {w.shape[1]} input channels per group: only dense or depthwise convs"
        return None


@dataclass
class _Selected:
    """A conv the pass may rewrite: its node, conv info, report name, kernel, shape (None without shapes), FFT
    grid text and device."""

    node: Any
    info: Any
    where: str
    kernel: tuple[int, int]
    shape: Any
    grid: str | None
    device: str


def _plan(gm: Any, selected: list[_Selected], report: Any, aten: bool) -> dict[Any, str]:
    """`mode='auto'`: how each selected conv runs ("fft": rewritten; "layout": run channels-last between
    conversions inserted here; "kept": left as it is), its report line naming the chosen candidate and every
    candidate's predicted time, and the layout conversions.

    ATen graphs (the torch.compile backend) are laid out by inductor, which runs every CPU conv channels-last: the
    candidates are priced with channels-last neighbours and only the FFT is a rewrite. Module graphs: each run of
    layout-agnostic ops around selected convs (`lkfx.graph.layout`) is priced both ways: NCHW, each conv taking
    its best candidate with NCHW neighbours (channels-last paying its own two conversions), against
    channels-last, each conv taking the better of channels-last and FFT with channels-last neighbours (in such a
    run an eager conv runs channels-last), plus one conversion per
    tensor entering and leaving the run (other ops in the run, 1x1 convs, BN, activations, are taken to cost the
    same in both layouts). The cheaper plan is applied."""
    from lkfx.backends.fft_cost import LABELS, cost_model
    from lkfx.graph import layout
    from lkfx.modules.fft_conv import FFTConv2d

    if aten:
        for c in selected:
            c.shape = replace(c.shape, channels_last=True)
    models = {c.node: cost_model(c.device) for c in selected}
    own = {c.node: models[c.node].choose(c.shape) for c in selected}
    in_cl = {c.node: models[c.node].choose(replace(c.shape, channels_last=True), ("channels_last", "fft"))
             for c in selected}
    decisions, regions = dict(own), {}
    if not aten:
        planned: set[Any] = set()
        for c in selected:
            if c.node in planned:
                continue
            region = layout.region_of(gm, c.node, (FFTConv2d,))
            convs = [d.node for d in selected if d.node in region]
            planned.update(convs)
            entering, leaving = layout.edges(gm, region)
            moved = [n for n in (*entering, *leaving) if not layout.is_channels_last(n)]
            model = models[c.node]
            convert = sum(2 * model.t0["op"] + layout.nbytes(n) * model.convert_s for n in moved)
            as_nchw = sum(own[n].seconds[own[n].choice] for n in convs)
            as_cl = sum(in_cl[n].seconds[in_cl[n].choice] for n in convs) + convert
            if as_cl < as_nchw and moved:
                layout.convert(gm, region)
                text = (f"in a channels-last run of {len(region)} ops converted at its {len(moved)} edges (predicted "
                        f"{as_cl * 1e3:.3g} ms for its {len(convs)} large convs and the conversions, against "
                        f"{as_nchw * 1e3:.3g} ms in NCHW)")
                for n in convs:
                    decisions[n], regions[n] = in_cl[n], text
        for c in selected:
            choice = decisions[c.node].choice
            if c.node not in regions and choice != "fft" and (choice == "channels_last") != c.shape.channels_last:
                layout.convert(gm, {c.node}, choice == "channels_last")
                regions[c.node] = "converted in and out"
    choices = {}
    for c in selected:
        d = decisions[c.node]
        choices[c.node] = "fft" if d.fft else "layout" if c.node in regions else "kept"
        grid = f" {c.grid}" if d.fft else ""
        where_run = f", {regions[c.node]}" if c.node in regions else ""
        text = f"{c.shape.describe()} -> {LABELS[d.choice]}{grid}: {d.reason}{where_run}"
        if choices[c.node] == "kept":
            report.skip(c.where, f"{text}; kept as it is")
        else:
            report.note(f"{c.where}: {text}")
    return choices


def _meta_value(node: Any) -> Any:
    """The example value torch.fx recorded for `node` (make_fx's ``val``), or None."""
    import torch

    value = getattr(node, "meta", {}).get("val")
    return value if isinstance(value, torch.Tensor) else None


def _fx_functional(gm: Any, node: Any, view: Any, padding: Any, groups: int) -> None:
    """Replace an ATen conv node by a call of `fft_conv2d` on the same input, weight and bias nodes."""
    from lkfx.modules.fft_conv import fft_conv2d

    args = (view.arg(node, "input"), view.arg(node, "weight"), view.arg(node, "bias"))
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(fft_conv2d, args, {"padding": padding, "groups": groups})
    view.replace(node, new)


# --- ONNX helpers ---------------------------------------------------------------------------------------------
class _OnnxShapes:
    """Static shapes of tensors: their own, else from one run of ONNX shape inference (done when first needed)."""

    def __init__(self, graph: Any):
        self.graph = graph
        self._inferred: dict[str, list] | None = None

    def of(self, tensor: Any) -> list | None:
        shape = tensor.shape
        if shape is not None and all(isinstance(d, int) and d > 0 for d in shape[1:]):
            return [d if isinstance(d, int) else None for d in shape]
        if self._inferred is None:
            self._inferred = self._infer()
        return self._inferred.get(tensor.name, shape)

    def _infer(self) -> dict[str, list]:
        import onnx
        import onnx_graphsurgeon as gs

        model = onnx.shape_inference.infer_shapes(gs.export_onnx(self.graph, do_type_check=False))
        out = {}
        for vi in (*model.graph.input, *model.graph.value_info, *model.graph.output):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                out[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                for d in vi.type.tensor_type.shape.dim]
        return out


def _onnx_fft_subgraph(graph: Any, view: Any, conv: Any, w_shape: tuple[int, ...], plan: Any) -> None:
    """Replace `conv` by the DFT computation of `plan` (see the module docstring); writes conv's output tensor."""
    import onnx_graphsurgeon as gs

    prefix = conv.name or conv.outputs[0].name

    def const(hint: str, value) -> Any:
        return gs.Constant(view.fresh_name(f"{prefix}_fft_{hint}"), np.array(value))  # keeps 0-d scalars 0-d

    def i64(hint: str, value) -> Any:
        return const(hint, np.asarray(value, dtype=np.int64))

    def op(kind: str, inputs: list, hint: str, out: Any = None, **attrs) -> Any:
        out = out if out is not None else gs.Variable(view.fresh_name(f"{prefix}_fft_{hint}"))
        graph.nodes.append(gs.Node(kind, view.fresh_name(f"{prefix}_fft_{hint}_node"), attrs, list(inputs), [out]))
        return out

    def cmul(a: Any, b: Any, hint: str, conj: bool) -> Any:
        """a * b or a * conj(b) for (..., 2) real/imaginary tensors (b may broadcast)."""
        sign = np.array([1, -1] if conj else [-1, 1], dtype=np.float32)
        if isinstance(b, np.ndarray):
            re, im = const(f"{hint}_re", b.real[..., None].astype(np.float32)), \
                const(f"{hint}_im", (b.imag[..., None] * sign).astype(np.float32))
        else:
            re = op("Gather", [b, i64(f"{hint}_i0", [0])], f"{hint}_re", axis=-1)
            im = op("Mul", [op("Gather", [b, i64(f"{hint}_i11", [1, 1])], f"{hint}_im2", axis=-1),
                            const(f"{hint}_sign", sign)], f"{hint}_im")
        swapped = op("Gather", [a, i64(f"{hint}_i10", [1, 0])], f"{hint}_swap", axis=-1)
        return op("Add", [op("Mul", [a, re], f"{hint}_t1"), op("Mul", [swapped, im], f"{hint}_t2")], hint)

    out_ch, in_per_group = int(w_shape[0]), int(w_shape[1])
    (h0, h1), (w0, w1) = plan.taps
    n, m = plan.size
    x, weight, y = conv.inputs[0], conv.inputs[1], conv.outputs[0]
    bias = conv.inputs[2] if len(conv.inputs) > 2 and conv.inputs[2].name else None
    conv.inputs.clear()
    conv.outputs.clear()
    ax2, ax3 = i64("axis2", 2), i64("axis3", 3)
    n_len, m_len = i64("n", n), i64("m", m)
    last = i64("last", [-1])

    # kernel spectrum Q = DFT2(kept taps) * conj(phase of the roll) * Hermitian weights; the runtime uses conj(Q)
    if (h0, h1, w0, w1) != (0, w_shape[2], 0, w_shape[3]):
        weight = op("Slice", [weight, i64("taps_lo", [h0, w0]), i64("taps_hi", [h1, w1]), i64("taps_ax", [2, 3])],
                    "taps")
    g = op("DFT", [op("Unsqueeze", [weight, last], "w5"), m_len, ax3], "w_rfft", onesided=1)
    g = op("DFT", [g, n_len, ax2], "w_fft")
    rows, cols = np.arange(n)[:, None], np.arange(m // 2 + 1)[None, :]
    hermitian = np.where((cols == 0) | (2 * cols == m), 1.0, 2.0)
    phase = np.exp(2j * math.pi * (rows * plan.shift[0] / n + cols * plan.shift[1] / m)) * hermitian
    q = cmul(g, phase, "q", conj=False)

    xf = op("DFT", [op("Unsqueeze", [x, last], "x5"), m_len, ax3], "x_rfft", onesided=1)
    xf = op("DFT", [xf, n_len, ax2], "x_fft")
    mr = m // 2 + 1
    group = int(conv.attrs.get("group", 1))
    if group > 1:  # depthwise: output channel c * multiplier + j reads input channel c
        q = op("Reshape", [q, i64("q_shape", [group, out_ch // group, n, mr, 2])], "q_dw")
        yf = cmul(op("Unsqueeze", [xf, i64("ax_mult", [2])], "x6"), q, "prod", conj=True)
        yf = op("Reshape", [yf, i64("y_shape", [-1, out_ch, n, mr, 2])], "y_fft")
    else:
        zero, one = i64("re_idx", 0), i64("im_idx", 1)
        qr = op("Gather", [q, zero], "q_re", axis=4)
        qi = op("Gather", [q, one], "q_im", axis=4)
        top = op("Concat", [qr, op("Neg", [qi], "q_neg_im")], "q_top", axis=0)
        bottom = op("Concat", [qi, qr], "q_bottom", axis=0)
        block = op("Transpose", [op("Concat", [top, bottom], "q_block", axis=1)], "q_blockT", perm=[2, 3, 1, 0])
        xt = op("Transpose", [xf], "x_t", perm=[2, 3, 0, 4, 1])
        xt = op("Reshape", [xt, i64("x_rows", [n, mr, -1, 2 * in_per_group])], "x_rows")
        yt = op("MatMul", [xt, block], "y_rows")
        yt = op("Reshape", [yt, i64("y_split", [n, mr, -1, 2, out_ch])], "y_split")
        yf = op("Transpose", [yt], "y_fft", perm=[2, 4, 0, 1, 3])
    ys = op("DFT", [yf, gs.Variable.empty(), ax2], "y_ifft_h", inverse=1)
    ys = op("Slice", [ys, i64("h0", [0]), i64("ho", [plan.out[0]]), i64("h_ax", [2])], "y_rows_kept")
    ys = op("DFT", [ys, m_len, ax3], "y_ifft_w", inverse=1)
    ys = op("Slice", [ys, i64("w0", [0, 0]), i64("wo", [plan.out[1], 1]), i64("w_ax", [3, 4])], "y_real")
    if bias is None:
        op("Squeeze", [ys, i64("sq", [4])], "y", out=y)
    else:
        ys = op("Squeeze", [ys, i64("sq", [4])], "y_nobias")
        op("Add", [ys, op("Unsqueeze", [bias, i64("b_ax", [1, 2])], "b3")], "y", out=y)
