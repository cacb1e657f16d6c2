"""The ONNX / TensorRT plugin node for depthwise convs, shared by `lower_dwconv`, the op's ONNX export
(`lkfx.backends.dwconv_op`), the onnxruntime verification route (`lkfx.backends.ort_ops`) and the TensorRT plugin
(`lkfx.backends.tensorrt`). Imports nothing heavy, so the ONNX path of `lower_dwconv` needs no torch.

    lkfx::dwconv2d(x, weight, bias) -> y
        x (N, C, H, W), weight (C, 1, KH, KW), bias (C,): one type (float32, float16 or bfloat16)
        strides: [sh, sw]; pads: [top, left, bottom, right] (ONNX's order)
        plugin_namespace="lkfx", plugin_version="1", aot=1: the TensorRT ONNX parser's plugin lookup keys and
        its request for the ahead-of-time implementation

op_type is the plugin's name and not an ONNX op's: the TensorRT parser looks unknown op_types up in its plugin
registry, and runtimes without the plugin fail loudly instead of running something else.
"""

from __future__ import annotations

from collections.abc import Sequence

PLUGIN_NAME = "dwconv2d"
PLUGIN_NAMESPACE = "lkfx"
PLUGIN_VERSION = "1"
PLUGIN_DOMAIN = "lkfx"


def plugin_node_attrs(stride: Sequence[int], padding: Sequence[int]) -> dict:
    """Attributes of the plugin node: the conv's strides and pads, and the TensorRT plugin lookup keys."""
    return {"strides": [int(s) for s in stride], "pads": [int(p) for p in padding],
            "plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION, "aot": 1}


def output_size(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int]) -> tuple[int, int]:
    """Output (OH, OW) of the conv on a `size` (H, W) map; `padding` = (top, left, bottom, right)."""
    pt, pl, pb, pr = padding
    return ((size[0] + pt + pb - kernel[0]) // stride[0] + 1, (size[1] + pl + pr - kernel[1]) // stride[1] + 1)
