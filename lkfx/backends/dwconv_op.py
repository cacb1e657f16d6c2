"""``torch.ops.lkfx.dwconv2d``: depthwise 2-D convolution as a PyTorch custom op.

    dwconv2d(x, weight, bias, stride, padding) -> y
        x (N, C, H, W); weight (C, 1, KH, KW); bias (C,) or None; stride [sh, sw], each 1 or 2;
        padding [top, left, bottom, right] (ONNX's order, so 'same' with an even kernel is expressible)

    y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, groups=C)

Where it runs:
- CUDA tensors: the Triton kernels of `lkfx.backends.dwconv_triton` (fp32 / fp16 / bf16, fp32 accumulation).
- CPU tensors: the fastest of NCHW direct (``F.conv2d``), channels-last direct (oneDNN, converting in and out
  when the input is NCHW) and, at stride 1, the FFT (`lkfx.modules.fft_conv.apply_spectrum`), as predicted by
  `lkfx.backends.fft_cost`'s cost model, calibrated once per machine. The output has the input's layout
  (channels-last in, channels-last out; the fake implementation says the same). The FFT's kernel spectrum is
  cached per weight (tensor, storage, version: the newest 64) while no gradient must reach the weight.

Gradients: registered with ``register_autograd``; the backward calls the ops ``lkfx::dwconv2d_grad_input`` and
``lkfx::dwconv2d_grad_weight`` (Triton on CUDA, ``aten.convolution_backward`` on the padded input on CPU), so
`torch.compile` / AOTAutograd trace the backward too. Every op has a fake implementation (shapes only) for
``torch.compile`` and ``torch.export``.

ONNX: `onnx_translation_table()` gives ``torch.onnx.export(..., custom_translation_table=...)`` the
translation to the TensorRT plugin node that `lower_dwconv` writes (`lkfx.backends.dwconv_plugin`), with
inputs x, weight, bias (always three: a conv without bias gets zeros).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lkfx.backends.dwconv_plugin import PLUGIN_DOMAIN, PLUGIN_NAME, output_size, plugin_node_attrs
from lkfx.graph.layout import memory_format_of


def _pad(x: torch.Tensor, padding: Sequence[int]) -> torch.Tensor:
    pt, pl, pb, pr = padding
    return F.pad(x, (pl, pr, pt, pb)) if any(padding) else x


_SPECTRA: dict[tuple, tuple[weakref.ref, torch.Tensor]] = {}  # spectra of weights no gradient reaches, newest last
_SPECTRA_KEPT = 64


def _spectrum(weight: torch.Tensor, plan, dtype: torch.dtype) -> torch.Tensor:
    """The weight's kernel spectrum, cached while no gradient must reach it: keyed by the tensor (held weakly, so
    a new tensor reusing a dead one's id and memory is not mistaken for it), its storage and its version."""
    from lkfx.modules.fft_conv import kernel_spectrum

    if torch.is_grad_enabled() and weight.requires_grad:
        return kernel_spectrum(weight, plan, dtype, weight.shape[0])
    key = (id(weight), weight.data_ptr(), weight._version, plan, dtype, torch.is_inference_mode_enabled())
    ref, spec = _SPECTRA.get(key, (None, None))
    if ref is None or ref() is not weight:
        while len(_SPECTRA) >= _SPECTRA_KEPT:
            del _SPECTRA[next(iter(_SPECTRA))]
        spec = kernel_spectrum(weight, plan, dtype, weight.shape[0])
        _SPECTRA[key] = (weakref.ref(weight), spec)
    return spec


def _cpu_forward(x, weight, bias, stride, padding):
    """The cost model's choice among NCHW direct, channels-last direct and (stride 1) FFT; the output has the
    input's layout."""
    from lkfx.backends.fft_cost import CANDIDATES, ConvShape, cost_model, fft_plan
    from lkfx.modules.fft_conv import apply_spectrum

    pt, pl, pb, pr = padding
    kernel = tuple(weight.shape[2:])
    layout = memory_format_of(x)
    choice = "channels_last" if layout == torch.channels_last else "nchw"
    if x.is_floating_point() and max(kernel) > 1 and all(p <= k - 1 for p, k in zip(padding, kernel * 2, strict=True)):
        shape = ConvShape(x.shape[0], x.shape[1], x.shape[1], x.shape[1], tuple(x.shape[2:]), kernel,
                          ((pt, pb), (pl, pr)), layout == torch.channels_last)
        allowed = CANDIDATES if tuple(stride) == (1, 1) else ("nchw", "channels_last")  # stride 2: priced at 1
        choice = cost_model("cpu").choose(shape, allowed).choice
    if choice == "fft":
        plan = fft_plan(tuple(x.shape[2:]), kernel, shape.pads)
        dtype = torch.promote_types(x.dtype, torch.float32)
        return apply_spectrum(x, _spectrum(weight, plan, dtype), bias, plan, x.shape[1])
    x = x.contiguous(memory_format=torch.channels_last if choice == "channels_last" else torch.contiguous_format)
    if (pt, pl) == (pb, pr):
        y = F.conv2d(x, weight, bias, tuple(stride), (pt, pl), groups=x.shape[1])
    else:
        y = F.conv2d(_pad(x, padding), weight, bias, tuple(stride), groups=x.shape[1])
    return y.contiguous(memory_format=layout)


def _check(x, weight, bias, stride, padding) -> None:
    """Shapes the kernels rely on (they index memory from them): refuse anything else with the expected form."""
    c = x.shape[1] if x.dim() == 4 else None
    ok = (c is not None and weight.dim() == 4 and tuple(weight.shape[:2]) == (c, 1)
          and (bias is None or tuple(bias.shape) == (c,)) and len(stride) == 2 and set(stride) <= {1, 2}
          and len(padding) == 4 and min(padding) >= 0)
    if not ok:
        raise ValueError(f"lkfx::dwconv2d expects x (N, C, H, W), weight (C, 1, KH, KW), bias (C,) or None, stride "
                         f"[sh, sw] of 1 or 2, padding [top, left, bottom, right] >= 0; got x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, bias {None if bias is None else tuple(bias.shape)}, stride "
                         f"{list(stride)}, padding {list(padding)}")
    oh, ow = output_size(x.shape[2:], weight.shape[2:], stride, padding)
    if oh < 1 or ow < 1:
        raise ValueError(f"lkfx::dwconv2d: a {tuple(weight.shape[2:])} kernel with padding {list(padding)} has no "
                         f"output on a {tuple(x.shape[2:])} map")
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        raise ValueError("lkfx::dwconv2d: x, weight and bias must be on one device")


@torch.library.custom_op("lkfx::dwconv2d", mutates_args=())
def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: list[int],
             padding: list[int]) -> torch.Tensor:
    """Depthwise conv; see the module docstring."""
    _check(x, weight, bias, stride, padding)
    if x.is_cuda:
        from lkfx.backends import dwconv_triton

        return dwconv_triton.forward(x, weight, bias, tuple(stride), tuple(padding))
    return _cpu_forward(x, weight, bias, stride, padding)


@dwconv2d.register_fake
def _(x, weight, bias, stride, padding):
    _check(x, weight, bias, stride, padding)
    oh, ow = output_size(x.shape[2:], weight.shape[2:], stride, padding)
    return x.new_empty((x.shape[0], x.shape[1], oh, ow)).contiguous(memory_format=memory_format_of(x))


@torch.library.custom_op("lkfx::dwconv2d_grad_input", mutates_args=())
def dwconv2d_grad_input(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                        padding: list[int]) -> torch.Tensor:
    """Gradient of dwconv2d with respect to x (x is read for its shape and dtype only on CUDA)."""
    if grad.is_cuda:
        from lkfx.backends import dwconv_triton

        return dwconv_triton.grad_input(grad, weight, tuple(x.shape[2:]), tuple(stride), tuple(padding))
    return _cpu_backward(grad, x, weight, stride, padding, (True, False))[0]


@dwconv2d_grad_input.register_fake
def _(grad, x, weight, stride, padding):
    return torch.empty_like(x)


@torch.library.custom_op("lkfx::dwconv2d_grad_weight", mutates_args=())
def dwconv2d_grad_weight(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: list[int],
                         padding: list[int]) -> torch.Tensor:
    """Gradient of dwconv2d with respect to the weight (the weight is read for its shape and dtype)."""
    if grad.is_cuda:
        from lkfx.backends import dwconv_triton

        dw = dwconv_triton.grad_weight(grad, x, tuple(weight.shape[2:]), tuple(stride), tuple(padding))
        return dw.to(weight.dtype)
    return _cpu_backward(grad, x, weight, stride, padding, (False, True))[1]


@dwconv2d_grad_weight.register_fake
def _(grad, x, weight, stride, padding):
    return torch.empty_like(weight)


def _cpu_backward(grad, x, weight, stride, padding, mask):
    xp = _pad(x, padding)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, xp, weight, None, list(stride), [0, 0], [1, 1], False, [0, 0], x.shape[1], [*mask, False])
    if gx is not None:
        pt, pl = padding[0], padding[1]
        gx = gx[:, :, pt:pt + x.shape[2], pl:pl + x.shape[3]].contiguous()
    return gx, gw


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (list(stride), list(padding), bias is not None)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    stride, padding, has_bias = ctx.conf
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.lkfx.dwconv2d_grad_input(grad, x, weight, stride, padding)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.lkfx.dwconv2d_grad_weight(grad, x, weight, stride, padding)
    if has_bias and ctx.needs_input_grad[2]:
        gb = grad.sum((0, 2, 3))
    return gx, gw, gb, None, None


dwconv2d.register_autograd(_backward, setup_context=_setup_context)


def onnx_translation_table() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the op becomes the plugin node."""
    from onnxscript import opset18 as op
    from onnxscript import values

    _register_onnx_schema()
    plugin = values.Opset(PLUGIN_DOMAIN, 1)[PLUGIN_NAME]

    def translate(x, weight, bias=None, stride=(1, 1), padding=(0, 0, 0, 0)):
        if bias is None:  # the plugin always takes a bias: zeros of the weight's type, constant-folded by runtimes
            bias = op.ReduceSum(op.Sub(weight, weight), op.Constant(value_ints=[1, 2, 3]), keepdims=0)
        return plugin(x, weight, bias, **plugin_node_attrs(stride, padding))

    return {torch.ops.lkfx.dwconv2d.default: translate}


def _register_onnx_schema() -> None:
    """Declare the plugin node to onnx (the exporter builds nodes from schemas; onnx.checker then checks it)."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(PLUGIN_NAME, PLUGIN_DOMAIN):
        return
    param = OpSchema.FormalParameter
    ints, string, integer = OpSchema.AttrType.INTS, OpSchema.AttrType.STRING, OpSchema.AttrType.INT
    onnx.defs.register_schema(OpSchema(
        PLUGIN_NAME, PLUGIN_DOMAIN, 1,
        doc="Depthwise 2-D convolution (lkfx TensorRT plugin): x (N, C, H, W), weight (C, 1, KH, KW), bias (C,).",
        inputs=[param("x", "T"), param("weight", "T"), param("bias", "T")],
        outputs=[param("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[OpSchema.Attribute("strides", ints, "stride per spatial axis"),
                    OpSchema.Attribute("pads", ints, "zero padding: top, left, bottom, right"),
                    OpSchema.Attribute("plugin_namespace", string, "TensorRT plugin namespace"),
                    OpSchema.Attribute("plugin_version", string, "TensorRT plugin version"),
                    OpSchema.Attribute("aot", integer, "1: use the plugin's ahead-of-time implementation")],
    ))
