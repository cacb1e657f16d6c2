"""Run ONNX models that hold lkfx plugin nodes in onnxruntime, to verify a lowered model (not for speed).

onnxruntime has no kernel for the TensorRT plugin node ``lkfx::dwconv2d`` that `lower_dwconv` writes. This
route runs it through onnxruntime-extensions' Python custom ops (``pip install onnxruntime-extensions``):

1. `to_contrib` copies the model and turns each plugin node into a node of the extensions' Python-op domain
   ``ai.onnx.contrib`` with the same op_type; its strides and pads become int64 scalar attributes (the Python
   ops take no int lists).
2. The op computes ``F.conv2d(F.pad(x, pads), weight, bias, strides, groups=C)`` in PyTorch on the CPU: an
   implementation independent of lkfx's own kernels, so a wrong lowering (pads, strides, bias) shows up.
3. `run` opens an onnxruntime CPU session with the extensions library registered and runs it.

float32 models only (the Python op is declared for float tensors). Everything else runs on onnxruntime's own
kernels, as written (graph optimisations off, like `lkfx.graph.onnx.run`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lkfx.backends.dwconv_plugin import PLUGIN_DOMAIN, PLUGIN_NAME
from lkfx.errors import LkfxError

CONTRIB_DOMAIN = "ai.onnx.contrib"
_ATTRS = ("stride_h", "stride_w", "pad_top", "pad_left", "pad_bottom", "pad_right")
_registered = False


def _register() -> None:
    """Declare the Python op to onnxruntime-extensions (once per process)."""
    global _registered
    if _registered:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as e:
        raise LkfxError("running lkfx plugin nodes in onnxruntime needs onnxruntime-extensions: "
                        "pip install onnxruntime-extensions") from e

    @onnx_op(op_type=PLUGIN_NAME, inputs=[PyCustomOpDef.dt_float] * 3, outputs=[PyCustomOpDef.dt_float],
             attrs=dict.fromkeys(_ATTRS, PyCustomOpDef.dt_int64))
    def dwconv2d(x, weight, bias, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right):
        import torch
        import torch.nn.functional as F

        xt = F.pad(torch.from_numpy(np.asarray(x)), (pad_left, pad_right, pad_top, pad_bottom))
        w = torch.from_numpy(np.asarray(weight))
        y = F.conv2d(xt, w, torch.from_numpy(np.asarray(bias)), (stride_h, stride_w), groups=w.shape[0])
        return y.numpy()

    _registered = True


def to_contrib(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose ``lkfx::dwconv2d`` plugin nodes are onnxruntime-extensions Python-op nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain != PLUGIN_DOMAIN or node.op_type != PLUGIN_NAME:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        (sh, sw), (pt, pl, pb, pr) = attrs["strides"], attrs["pads"]
        if len(node.input) != 3 or not node.input[2]:
            raise LkfxError(f"plugin node '{node.name}' has {len(node.input)} inputs; lkfx::dwconv2d takes three "
                            "(x, weight, bias)")
        node.domain = CONTRIB_DOMAIN
        del node.attribute[:]
        node.attribute.extend(helper.make_attribute(k, int(v)) for k, v in zip(_ATTRS, (sh, sw, pt, pl, pb, pr),
                                                                               strict=True))
    if not any(o.domain == CONTRIB_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return out


def session(model: onnx.ModelProto):
    """An onnxruntime CPU session for `model` (plugin nodes run as Python ops), graph optimisations off."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    _register()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(get_library_path())
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(to_contrib(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of `model` for `feeds`, plugin nodes included."""
    return session(model).run(None, feeds)
