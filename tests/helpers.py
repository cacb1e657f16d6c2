"""Shared test helpers: random BatchNorm statistics, small ONNX graphs built with onnx.helper, and the
assertions every fold test makes (numerics within tolerance, the ONNX result valid and on the same opset).

Import as ``from helpers import ...``: pytest puts tests/ on sys.path, where tests/conftest.py lives.
"""

from __future__ import annotations

import operator
import socket
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from lkfx.compare import max_rel_error
from lkfx.graph import onnx as gonnx

TOL = 1e-5


def _ort_int8_weight_bits() -> int:
    """Weight bits for tests that hold onnxruntime's int8 output close to float. On x86 without VNNI (AVX2, or
    AVX-512 without VNNI) onnxruntime multiplies u8 activations by s8 weights with VPMADDUBSW, whose pairwise sums
    saturate at int16 (2 x 255 x 127 > 32767): 8-bit weights then drift by tens of steps. 7-bit weights cannot
    saturate (onnxruntime's own advice there is reduce_range, the same 7 bits)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 8
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return 8
    return 8 if any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")) else 7


ORT_INT8_WEIGHT_BITS = _ort_int8_weight_bits()
OPSET = 17


# --- torch --------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A free local TCP port for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_net():
    """The small conv net the DDP tests train (conv + BN stages, a strided conv, a linear head; input 3 x 8 x 8)."""
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


def randomize_bn(model, seed: int = 0):
    """Give every BatchNorm in `model` non-trivial running statistics and affine parameters; return it."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, torch.nn.modules.batchnorm._NormBase):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
            if m.weight is not None:
                m.weight.copy_(torch.rand(n, generator=gen) * 1.5 + 0.25)
                m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def torch_outputs(model, inputs: Sequence) -> list[np.ndarray]:
    import torch

    from lkfx.graph.fx import flat_outputs

    with torch.no_grad():
        return flat_outputs(model(*inputs))


def assert_same_outputs(reference, result, inputs: Sequence, tol: float = TOL) -> float:
    err = max_rel_error(torch_outputs(reference, inputs), torch_outputs(result, inputs))
    assert err <= tol, f"max relative error {err:.3g} > {tol:g}"
    return err


def fx_bn_nodes(gm) -> list:
    """Every node of `gm` that is a batch norm: a BatchNorm module call or a batch-norm function / ATen op."""
    import torch
    import torch.nn.functional as F

    aten = torch.ops.aten
    functions = {F.batch_norm, torch.batch_norm, aten.batch_norm.default, aten.native_batch_norm.default,
                 aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_no_training.default}
    modules = dict(gm.named_modules())
    out = []
    for node in gm.graph.nodes:
        bn_module = isinstance(modules.get(node.target), torch.nn.modules.batchnorm._NormBase)
        if node.op == "call_module" and bn_module:
            out.append(node)
        elif node.op == "call_function" and node.target in functions:
            out.append(node)
    return out


def fx_getitems(gm) -> list:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is operator.getitem]


# --- ONNX ---------------------------------------------------------------------------------------------------
def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def init(name: str, value: np.ndarray) -> onnx.TensorProto:
    """An initializer."""
    return numpy_helper.from_array(np.asarray(value), name)


def const_node(output: str, value: np.ndarray) -> onnx.NodeProto:
    """A Constant node producing `output`."""
    tensor = numpy_helper.from_array(np.asarray(value))
    return helper.make_node("Constant", [], [output], name=f"{output}_const", value=tensor)


def bn_initializers(rng: np.random.Generator, prefix: str, c: int, *, affine: bool = True) -> list:
    """scale, bias, mean, var of a BatchNormalization with `c` channels (scale 1, bias 0 when not affine)."""
    scale = (rng.random(c) * 1.5 + 0.25) if affine else np.ones(c)
    bias = (rng.random(c) - 0.5) if affine else np.zeros(c)
    mean = rng.random(c) * 2 - 1
    var = rng.random(c) * 1.5 + 0.25
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}_{k}")
            for k, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var))]


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    """A BatchNormalization reading `bn_initializers(prefix)`; training_mode=1 gets its statistics outputs."""
    ins = [x] + [f"{prefix}_{k}" for k in ("scale", "bias", "mean", "var")]
    outs = [y, f"{prefix}_mean_out", f"{prefix}_var_out"] if attrs.get("training_mode") else [y]
    return helper.make_node("BatchNormalization", ins, outs, name=prefix, **attrs)


def make_model(nodes, inputs: dict[str, Sequence[int]], outputs: Sequence[str], initializers,
               opset: int = OPSET) -> onnx.ModelProto:
    """A float32 model; output shapes come from onnx shape inference."""
    graph = helper.make_graph(
        nodes, "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph.output
    del model.graph.output[:]
    model.graph.output.extend(inferred)
    onnx.checker.check_model(model, full_check=True)
    return model


def feeds_for(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    return gonnx.random_inputs(model, seed)


def fold_onnx(model: onnx.ModelProto, **options):
    """Run fold_bn and check what every result must satisfy: the input untouched, onnx.checker, same opset."""
    import lkfx

    before = model.SerializeToString()
    passes = [("fold_bn", options)] if options else ["fold_bn"]
    out, report = lkfx.transform(model, passes, return_report=True)
    assert model.SerializeToString() == before, "transform(inplace=False) modified the input ModelProto"
    onnx.checker.check_model(out, full_check=True)
    opsets = [[(o.domain, o.version) for o in m.opset_import] for m in (model, out)]
    assert opsets[0] == opsets[1]
    return out, report["fold_bn"]


def assert_onnx_same(model: onnx.ModelProto, out: onnx.ModelProto, tol: float = TOL) -> float:
    feeds = feeds_for(model)
    err = max_rel_error(gonnx.run(model, feeds), gonnx.run(out, feeds))
    assert err <= tol, f"onnxruntime max relative error {err:.3g} > {tol:g}"
    return err


def op_types(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    raise KeyError(name)


def reasons(pass_report) -> list[str]:
    return [s.reason for s in pass_report.skipped]
