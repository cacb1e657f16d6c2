"""lower_dwconv: run large depthwise convs on lkfx's own kernel (an op swap: same weights, same result).

cuDNN runs large depthwise kernels far below the GPU's capability (RepLKNet measured 7-20x lost at 31x31).
This pass moves each depthwise conv whose kernel has a side of at least ``min_kernel`` (default 9) onto
`lkfx.backends`' depthwise conv: a Triton kernel behind ``torch.ops.lkfx.dwconv2d`` in PyTorch, a TensorRT
plugin node in ONNX::

    x ── Conv2d(C, C, K, groups=C) ── y      becomes   x ── torch.ops.lkfx.dwconv2d(x, W, b, stride, pads) ── y
    x ── Conv(group=C, W: C x 1 x K x K) ── y   becomes   x ── lkfx::dwconv2d(W, b or 0; strides, pads,
                                                                 plugin_namespace="lkfx", plugin_version="1",
                                                                 aot=1) ── y

torch.fx: ``nn.Conv2d`` modules (the new node reads the module's own weight and bias Parameters, so training
and tied weights are unaffected), ``F.conv2d`` / ``torch.conv2d`` calls and ATen ``aten.convolution`` /
``aten.conv2d`` nodes whose weight is a placeholder (graphs handed to a torch.compile backend): the weight's
values are never read, only its shape (from the tensor, or the node's ``val`` / ``tensor_meta``, which
``example_inputs`` fills in). On the CPU the op runs the fastest of NCHW direct, channels-last direct and the
FFT as lkfx's cost model predicts it (output in the input's layout); on CUDA, Triton; it has autograd, a fake
implementation for torch.compile / torch.export, and exports to the ONNX plugin node
(`lkfx.backends.dwconv_op.onnx_translation_table`).

ONNX: the Conv node becomes the plugin node in place (same inputs and output; a zero bias is added where the
conv had none, the plugin always takes three inputs); the op_type is the plugin's
name, ``dwconv2d`` in domain ``lkfx``, never a built-in op's name, so the TensorRT ONNX parser looks it up in
its plugin registry (`lkfx.backends.tensorrt` registers it) and other runtimes fail loudly instead of running
something else. onnxruntime runs it through `lkfx.backends.ort_ops` (verification only).

Which convs: 2-D, depthwise with one output channel per group (weight C x 1 x KH x KW, groups = C), float32 /
float16 / bfloat16 weights (the kernel accumulates in fp32), stride 1 or 2 per axis, dilation 1, zero padding
of any size (``'same'`` with even kernels included); ONNX ``auto_pad`` SAME_* only at stride 1 (else the padding
depends on the input size). Others are refused with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lkfx.errors import LkfxError
from lkfx.passes import Pass, PassContext, register_pass


def _selection_refusal(shape: tuple[int, ...] | None, groups: int, stride, dilation, min_kernel: int) -> str | None:
    """Why a conv with weight `shape` is not lowered, or None (the checks both frontends share)."""
    if shape is None:
        return "the weight's shape is unknown (computed in the graph); give example_inputs"
    if len(shape) != 4:
        return f"only 2-D convs are lowered, this one is {len(shape) - 2}-D"
    if shape[1] != 1 or groups != shape[0]:
        return (f"not depthwise with one filter per channel (weight {'x'.join(map(str, shape))}, "
                f"groups={groups})")
    kernel = shape[2:]
    if max(kernel) < min_kernel:
        return f"kernel {kernel[0]}x{kernel[1]} is below min_kernel={min_kernel}"
    if any(s not in (1, 2) for s in stride):
        return f"stride {tuple(stride)}: the kernel does strides 1 and 2"
    if any(d != 1 for d in dilation):
        return f"dilation {tuple(dilation)}: only dilation 1"
    return None


@register_pass
class LowerDwconv(Pass):
    name = "lower_dwconv"
    summary = "Run large depthwise convs on lkfx's Triton kernel (torch custom op) / a TensorRT plugin node (ONNX)."
    options = {"min_kernel": 9}

    def __init__(self, **options: Any):
        super().__init__(**options)
        k = self.config["min_kernel"]
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise LkfxError(f"option 'min_kernel' of pass '{self.name}' must be an int >= 1, got {k!r}")

    # --- torch.fx -----------------------------------------------------------------------------------
    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        import torch

        import lkfx.backends.dwconv_op  # noqa: F401  (registers torch.ops.lkfx.dwconv2d)
        from lkfx.graph.fx import propagate_shapes
        from lkfx.modules.fft_conv import conv_pads
        from lkfx.patterns.fx import FxView

        if ctx.example_inputs is not None:
            propagate_shapes(gm, ctx.example_inputs)
        view = FxView(gm)
        report = ctx.report
        graph = gm.graph
        for node in view.candidates(frozenset(["conv"])):
            report.matched += 1
            where = view.describe(node)
            computed = view.computed_conv_args(node)
            if computed:
                report.skip(where, f"its {', '.join(computed)} computed in the graph")
                continue
            info = view.conv(node)
            w_node = None if node.op == "call_module" else view.arg(node, "weight")
            shape = tuple(info.weight.shape) if info.weight is not None else _meta_shape(w_node)
            reason = _selection_refusal(shape, info.groups, info.stride, info.dilation, self.config["min_kernel"])
            if reason is None and info.padding_mode != "zeros":
                reason = f"padding mode '{info.padding_mode}': only zero padding"
            if reason is None and info.weight is not None and \
                    info.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                reason = f"the weight is {info.weight.dtype}; the kernel takes float32, float16 and bfloat16"
            if reason:
                report.skip(where, reason)
                continue
            (pt, pb), (pl, pr) = conv_pads(info.padding, shape[2:])
            with graph.inserting_before(node):
                if node.op == "call_module":
                    x = node.args[0] if node.args else node.kwargs["input"]
                    w = graph.get_attr(f"{node.target}.weight")
                    b = graph.get_attr(f"{node.target}.bias") if info.module.bias is not None else None
                else:
                    x, w, b = view.arg(node, "input"), w_node, view.arg(node, "bias")
                new = graph.call_function(torch.ops.lkfx.dwconv2d.default,
                                          (x, w, b, list(info.stride), [pt, pl, pb, pr]))
            view.replace(node, new)
            report.note(f"{where}: {shape[2]}x{shape[3]} depthwise, {shape[0]} channels, stride "
                        f"{tuple(info.stride)}, pads {[pt, pl, pb, pr]} -> torch.ops.lkfx.dwconv2d")
            report.rewritten += 1
        return view.finish() if report.modified else gm

    # --- ONNX ---------------------------------------------------------------------------------------
    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from lkfx.backends.dwconv_plugin import PLUGIN_DOMAIN, PLUGIN_NAME, plugin_node_attrs
        from lkfx.patterns.onnx import OnnxView, auto_pad, onnx_pads

        view = OnnxView(graph)
        report = ctx.report
        for conv in view.candidates(frozenset(["Conv"])):
            report.matched += 1
            where = view.describe(conv)
            w = view.const(conv.inputs[1])
            shape = tuple(w.shape) if w is not None else _static(conv.inputs[1].shape)
            attrs = conv.attrs
            stride = [int(s) for s in attrs.get("strides", [1, 1])]
            dilation = [int(d) for d in attrs.get("dilations", [1, 1])]
            reason = _selection_refusal(shape, int(attrs.get("group", 1)), stride, dilation,
                                        self.config["min_kernel"])
            mode = auto_pad(conv)
            if reason is None and mode.startswith("SAME") and stride != [1, 1]:
                reason = f"auto_pad={mode} with stride {stride}: the padding depends on the input size"
            if reason is None and w is not None and w.dtype.name not in ("float32", "float16", "bfloat16"):
                reason = f"the weight is {w.dtype}; the plugin takes float32, float16 and bfloat16"
            if reason:
                report.skip(where, reason)
                continue
            (pt, pb), (pl, pr) = onnx_pads(conv, shape[2:])
            if view.optional_input(conv, 2) is None:  # the plugin always takes a bias
                dtype = w.dtype if w is not None else (conv.inputs[1].dtype or np.float32)
                zeros = view.new_const(f"{where}_zero_bias", np.zeros(shape[0], dtype))
                if len(conv.inputs) > 2:
                    conv.inputs[2] = zeros  # was an empty optional input
                else:
                    conv.inputs.append(zeros)
            conv.op, conv.domain = PLUGIN_NAME, PLUGIN_DOMAIN
            conv.attrs = plugin_node_attrs(stride, [pt, pl, pb, pr])
            report.note(f"{where}: {shape[2]}x{shape[3]} depthwise, {shape[0]} channels, strides {stride}, pads "
                        f"{[pt, pl, pb, pr]} -> {PLUGIN_DOMAIN}::{PLUGIN_NAME} plugin node")
            report.rewritten += 1


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    """A graph value's static shape from its FX metadata (``val`` from make_fx / dynamo, or ``tensor_meta``)."""
    meta = getattr(node, "meta", {})
    value = meta.get("val", meta.get("tensor_meta"))
    shape = getattr(value, "shape", None)
    return _static(shape)


def _static(shape: Any) -> tuple[int, ...] | None:
    if shape is None:
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None
