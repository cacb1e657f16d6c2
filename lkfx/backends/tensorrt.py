"""TensorRT plugin ``lkfx::dwconv2d``: the ONNX plugin node of `lower_dwconv`, run by lkfx's Triton kernel.

UNVERIFIED: TensorRT cannot be installed where lkfx is developed and tested, so this file has never been run.
It is written against the TensorRT 10.8+ ``tensorrt.plugin`` ("quickly deployable plugins") documentation. The
kernel it hands to TensorRT is checked without TensorRT: the tests compile `compile_aot_forward` to PTX.

    import lkfx.backends.tensorrt          # registers the plugin (needs tensorrt, triton and a CUDA GPU)
    parser = trt.OnnxParser(network, logger)
    parser.parse_from_file("model.lowered.onnx")

How the ONNX parser finds it: a node whose op_type is not an ONNX op is looked up in the plugin registry by
op_type (``dwconv2d``), ``plugin_namespace`` (``lkfx``) and ``plugin_version`` (``1``) attributes; ``aot=1`` asks
for the ahead-of-time implementation, so engines contain the compiled kernel and run in plain TensorRT (trtexec,
C++) without Python. The node's other attributes, ``strides`` and ``pads`` (top, left, bottom, right), are the
plugin's attributes; its inputs are x (N, C, H, W), weight (C, 1, KH, KW) and bias (C,), all of one type
(fp32, fp16 or bf16).

Implementation: `_aot` compiles `lkfx.backends.dwconv_triton.aot_forward_kernel` (the tile code that
``torch.ops.lkfx.dwconv2d`` runs on CUDA, with arguments in the AOT order: input pointers, int32 scalars, output
pointer) to PTX; the scalars and the grid are symbolic expressions of the input shapes. Each block-size option of
`dwconv_triton.TILE_OPTIONS` is one tactic: TensorRT times them at engine build and keeps the fastest (the
counterpart of Triton's autotuning).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

try:
    import tensorrt as trt
    import tensorrt.plugin as trtp
except ImportError as e:
    raise ImportError("lkfx.backends.tensorrt registers a TensorRT plugin and needs TensorRT >= 10.8 "
                      "(pip install tensorrt)") from e

from lkfx.backends.dwconv_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE
from lkfx.backends.dwconv_triton import TILE_OPTIONS, compile_aot_forward

PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
_TRITON_TYPES = {trt.float32: "fp32", trt.float16: "fp16", trt.bfloat16: "bf16"}


@trtp.register(PLUGIN_ID)
def _describe(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
              strides: npt.NDArray[np.int32], pads: npt.NDArray[np.int32]) -> trtp.TensorDesc:
    out = x.like()
    for axis in (0, 1):
        size, kernel = x.shape_expr[2 + axis], weight.shape_expr[2 + axis]
        out.shape_expr[2 + axis] = (size + int(pads[axis] + pads[axis + 2]) - kernel) // int(strides[axis]) + 1
    return out


@trtp.autotune(PLUGIN_ID)
def _autotune(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc,
              outputs: tuple[trtp.TensorDesc]) -> list[trtp.AutoTuneCombination]:
    # '|': x, weight, bias and y share one type; every tile option is a tactic (numbered from 1)
    return [trtp.AutoTuneCombination("FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16, FP32|FP16|BF16", "LINEAR",
                                     list(range(1, len(TILE_OPTIONS) + 1)))]


@trtp.aot_impl(PLUGIN_ID)
def _aot(x: trtp.TensorDesc, weight: trtp.TensorDesc, bias: trtp.TensorDesc, strides: npt.NDArray[np.int32],
         pads: npt.NDArray[np.int32], outputs: tuple[trtp.TensorDesc],
         tactic: int) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
    tile = TILE_OPTIONS[tactic - 1]
    compiled = compile_aot_forward(_TRITON_TYPES[x.dtype], (int(strides[0]), int(strides[1])), tile)
    xs, ws, ys = x.shape_expr, weight.shape_expr, outputs[0].shape_expr
    scalars = (xs[1], xs[2], xs[3], ys[2], ys[3], ws[2], ws[3], int(pads[0]), int(pads[1]))  # AOT_SCALARS
    launch = trtp.KernelLaunchParams()
    launch.grid_x = xs[0] * trtp.cdiv(xs[1], tile[0])
    launch.grid_y = trtp.cdiv(ys[2], tile[1])
    launch.grid_z = trtp.cdiv(ys[3], tile[2])
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    extra_args = trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in scalars])
    return compiled.metadata.name.encode(), compiled.asm["ptx"].encode(), launch, extra_args
