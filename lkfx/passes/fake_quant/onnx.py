"""fake_quant on ONNX: fold BatchNorm, calibrate activation ranges in onnxruntime, insert QuantizeLinear /
DequantizeLinear (QDQ) pairs that onnxruntime and TensorRT run as int8.

    x -> Conv(W, b) -> BN -> Relu -> next

becomes (placement="ort"; "tensorrt" keeps the bias float and quantizes only the conv's input)::

    x -> Q -> DQ -> Conv(DQ(W_int8, s_w, axis=0), DQ(b_int32, s_x s_w)) -> Relu -> Q -> DQ -> next

Steps, in this order (the calibration data is checked first, before any work):

1. ``fold_bn`` folds every BatchNorm it can into its conv (a BN left over is reported and stays float).
2. Weights of Conv, Gemm and MatMul with a constant weight are quantized symmetric per output channel,
   ``s_c = max|W_c| / (2^(b-1) - 1)``, ``q = clamp(round(W / s_c), -(2^(b-1) - 1), 2^(b-1) - 1)``, stored as int8
   initializers read through ``DequantizeLinear(q, s, 0, axis)`` (axis 0 for Conv and ``transB=1`` Gemm, 1 for
   ``(K, N)`` weights): the file holds int8 weights, and onnxruntime fuses them into QLinearConv / QGemm /
   QLinearMatMul. ``weight_bits`` < 8 keeps the int8 container with the narrower grid.
3. Activation tensors are chosen by ``placement``:
   - ``"tensorrt"`` (NVIDIA ModelOpt's rules for conv nets): the data input of each quantized layer, and the
     shortcut input of a residual ``Add`` (not the one coming straight from a conv: TensorRT fuses that conv with
     the add; with convs on both sides, the shorter branch; a graph input as shortcut is quantized too), the rule
     shared with torch.fx in `lkfx.quant.placement`; everything else stays float and TensorRT picks its own int8
     regions.
   - ``"ort"`` (onnxruntime's QDQ layout): the inputs and outputs of Conv, Gemm, MatMul, Add, Mul, Concat and the
     pools, an output read only by a Relu / Clip taken after that activation (onnxruntime folds the Relu into the Q
     when the zero point is the grid minimum), and biases as int32, ``q_b = round(b / (s_x s_w))``, so every layer
     becomes an integer kernel (QLinearConv, QLinearAdd, QGemm, ...). Graph outputs stay float.
4. onnxruntime runs the model on the calibration batches with those tensors as extra outputs (tqdm bar);
   one `lkfx.quant.observers` observer per tensor (``method``, per tensor, asymmetric uint8 unless
   ``act_symmetric``) gives ``(scale, zero_point)``, and ``QuantizeLinear -> DequantizeLinear`` is inserted for the
   tensor's readers: ``x_hat = (clamp(round(x / s) + z, qmin, qmax) - z) * s``.

The result is approximate by design: ``x_hat`` differs from ``x`` by at most ``s / 2`` inside the calibrated range
(symmetric int8 activations may reach -128, which the torch fake-quant grid [-127, 127] does not). Needs opset >= 13
(per-axis DequantizeLinear) and ``act_bits=8`` (QuantizeLinear saturates to the 8-bit type).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lkfx.errors import LkfxError
from lkfx.passes.base import PassContext
from lkfx.patterns.onnx import OnnxView
from lkfx.quant import fallback
from lkfx.quant.placement import residual_skip
from lkfx.report import PassReport

LAYERS = ("Conv", "Gemm", "MatMul")
ORT_OPS = frozenset({"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool"})
FUSED_ACTIVATIONS = frozenset({"Relu", "Clip"})
VALUE_MOVING = frozenset({"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"})
OBSERVER_OPTIONS = ("percentile", "bins", "search_start_scale", "search_end_scale", "search_step")
MIN_OPSET = 13


def run_onnx(graph: gs.Graph, ctx: PassContext, config: dict) -> None:
    """Fold BN, calibrate on ``ctx.calib_data`` and insert QDQ pairs into `graph` (in place)."""
    from lkfx.quant.data import input_spec, load_calib_data

    make_observer = _observer_factory(graph, config)
    batches = load_calib_data(ctx.calib_data, input_spec(graph), num_batches=config["num_batches"],
                              batch_size=config["batch_size"])
    report = ctx.report
    _fold_bn(graph, report)

    view = OnnxView(graph)
    excluded = _excluded(graph, view, config["exclude"])
    floats = _float_tensors(graph)
    layers = {}
    for node in graph.nodes:
        if node.op not in LAYERS or node.domain not in (None, "", "ai.onnx"):
            continue
        report.matched += 1
        weight = _weight(view, node, floats)
        if isinstance(weight, str):
            report.skip(view.describe(node), weight)
        else:
            layers[view.describe(node)] = weight
    nodes = {view.describe(n): n for n in graph.nodes}
    layer_nodes = {id(nodes[k]) for k in layers}
    if config["placement"] == "tensorrt":
        points = _tensorrt_points(view, [nodes[k] for k in layers], layer_nodes, floats)
    else:
        points = _ort_points(view, graph, layer_nodes, floats)
    points = {name: [view.describe(r) for r in readers if view.describe(r) not in excluded]
              for name, (_, readers) in points.items()}
    points = {name: readers for name, readers in points.items() if readers}

    qp, guards = _calibrate(graph, points, batches, make_observer)
    for name, guard in guards.items():
        report.note(f"range of {name}: {guard}")
    keep = dict.fromkeys(k for k in layers if k in excluded)
    for k in keep:
        report.skip(k, f"excluded (exclude={';'.join(config['exclude'])}): weight and input stay float")
    if config["fallback"] == "auto":
        for k, why in _fallback(graph, layers, points, qp, batches, config, set(keep), report).items():
            keep[k] = None
            report.skip(k, f"kept in float by fallback=auto: {why}")
    _apply(graph, layers, points, qp, config, set(keep))
    report.rewritten += len(layers) - len(keep)
    graph.cleanup().toposort()
    axis = "per output channel" if config["per_channel"] else "per tensor"
    report.note(f"weights: {report.rewritten} layers, {config['weight_bits']}-bit symmetric {axis}")
    report.note(f"activations: {len(points)} tensors, {'int8 symmetric' if config['act_symmetric'] else 'uint8'} "
                f"per tensor, calibrated with {config['method']} on {len(batches)} batches")
    report.note(PLACEMENT_NOTES[config["placement"]])


PLACEMENT_NOTES = {
    "tensorrt": "placement=tensorrt: QDQ only on layer inputs and residual skips, the layout TensorRT fuses into int8 "
                "kernels; onnxruntime runs such a model partly in float (on CPU ~3x slower than placement=ort): for "
                "onnxruntime use placement=ort",
    "ort": "placement=ort: QDQ on the inputs and outputs of every quantized op and int32 biases, the layout "
           "onnxruntime turns into integer kernels (QLinearConv, QLinearAdd, ...); for TensorRT use "
           "placement=tensorrt. On x86 CPUs without VNNI (AVX2) onnxruntime's int8 kernels saturate with 8-bit "
           "weights: quantize with weight_bits=7 for those",
}


def _excluded(graph: gs.Graph, view: OnnxView, exclude: list[str]) -> set[str]:
    """Names (`OnnxView.describe`) of the nodes that `exclude` names, by node name or op type; an entry that names
    nothing is an error (a typo would otherwise quantize the layer silently)."""
    out = set()
    for entry in exclude:
        hit = {view.describe(n) for n in graph.nodes if entry in (n.name, n.op, view.describe(n))}
        if not hit:
            raise LkfxError(f"exclude: '{entry}' is neither a node name nor an op type of the model (op types: "
                            f"{', '.join(sorted({n.op for n in graph.nodes}))})")
        out |= hit
    return out


def _apply(graph: gs.Graph, layers: dict[str, tuple[np.ndarray, int]], points: dict[str, list[str]], qp: dict,
           config: dict, keep: set[str]) -> None:
    """Quantize the weights of `layers` and insert QDQ on `points` for their readers, except nodes in `keep`."""
    view = OnnxView(graph)
    nodes, tensors = {view.describe(n): n for n in graph.nodes}, graph.tensors()
    names = view.fresh_name
    for key, (w, axis) in layers.items():
        if key in keep:
            continue
        node = nodes[key]
        s_w = _quantize_weight(graph, names, node, w, axis, config["weight_bits"], config["per_channel"])
        x = node.inputs[0]
        if config["placement"] == "ort" and x.name in points and key in points[x.name]:
            _quantize_bias(view, graph, names, node, qp[x.name][0] * s_w)
    act_type = np.int8 if config["act_symmetric"] else np.uint8
    for name, readers in points.items():
        readers = [nodes[k] for k in readers if k not in keep]
        if readers:
            _insert_qdq(graph, names, tensors[name], readers, *qp[name], act_type)


def _fallback(graph: gs.Graph, layers: dict, points: dict, qp: dict, batches: list, config: dict, keep: set[str],
              report: PassReport) -> dict[str, str]:
    """Layers to keep in float (`lkfx.quant.fallback`), measured in onnxruntime. Returns ``{layer: why}``."""
    base = graph.copy()
    reference = [r.astype(np.float64) for r in _outputs(base, batches)]

    def error(names: set[str]) -> float:
        g = base.copy()
        _apply(g, layers, points, qp, config, keep | names)
        g.cleanup().toposort()
        return fallback.relative_error([a.astype(np.float64) for a in _outputs(g, batches)], reference)

    kept, note = fallback.float_layers([k for k in layers if k not in keep], error, config["fallback_bound"])
    report.note(note)
    return kept


def _outputs(graph: gs.Graph, batches: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """The graph's outputs on every batch (onnxruntime, CPU), each output concatenated over the batches."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(gs.export_onnx(graph, do_type_check=False).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    runs = [sess.run(None, b) for b in batches]
    return [np.concatenate([r[i].ravel() for r in runs]) for i in range(len(runs[0]))]


def _observer_factory(graph: gs.Graph, config: dict):
    """Check the model and the options that concern ONNX; return a function making one activation observer."""
    from lkfx.quant.observers import make_observer

    if config["placement"] not in PLACEMENT_NOTES:
        raise LkfxError(f"placement must be 'tensorrt' or 'ort', got {config['placement']!r}")
    if config["qat"]:
        raise LkfxError("qat=true is for torch models (it fuses conv + BN into trainable fake-quant modules); an ONNX "
                        "model cannot be trained here: drop qat (post-training calibration), or run fake_quant with "
                        "qat=true on the torch model and export it")
    fallback.check_options(config)
    if config["act_bits"] != 8:
        raise LkfxError(f"act_bits={config['act_bits']!r}: on ONNX activations are 8-bit (QuantizeLinear saturates to "
                        "the 8-bit type); use act_bits=8")
    bits = config["weight_bits"]
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise LkfxError(f"weight_bits must be an integer from 2 to 8 on ONNX (int8 storage), got {bits!r}")
    quantized = sum(n.op in ("QuantizeLinear", "DequantizeLinear") for n in graph.nodes)
    if quantized:
        raise LkfxError(f"the model is already quantized ({quantized} QuantizeLinear / DequantizeLinear nodes); "
                        "give fake_quant the float model")
    if (graph.opset or 0) < MIN_OPSET:
        raise LkfxError(f"fake_quant needs ONNX opset >= {MIN_OPSET} (per-channel DequantizeLinear), the model has "
                        f"opset {graph.opset}; convert it with onnx.version_converter.convert_version(model, 13)")
    options = {k: config[k] for k in OBSERVER_OPTIONS if config.get(k) is not None}

    def make():
        return make_observer(config["method"], bits=8, symmetric=config["act_symmetric"], **options)

    make()  # unknown method or bad option: fail before any work
    return make


def _fold_bn(graph: gs.Graph, report: PassReport) -> None:
    from lkfx.passes.fold_bn import FoldBN

    folded = PassReport("fold_bn", "onnx")
    FoldBN().run_onnx(graph, PassContext(folded))
    if folded.rewritten:
        report.note(f"fold_bn folded {folded.rewritten} BatchNormalization first")
    for s in folded.skipped:
        report.note(f"fold_bn did not fold {s.where} (it stays float): {s.reason}")


def _float_tensors(graph: gs.Graph) -> set[str]:
    """Names of the float32 tensors, from the declared types and onnx shape inference."""
    import onnx

    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph, do_type_check=False))
    g = model.graph
    float32 = onnx.TensorProto.FLOAT
    names = {v.name for v in (*g.input, *g.output, *g.value_info) if v.type.tensor_type.elem_type == float32}
    return names | {t.name for t in graph.tensors().values() if t.dtype == np.float32}


def _weight(view: OnnxView, node: gs.Node, floats: set[str]) -> tuple[np.ndarray, int] | str:
    """(weight, per-channel axis) of a layer, or the reason it is not quantized."""
    if len(node.inputs) < 2 or node.inputs[0].name not in floats:
        return "its input is not a float32 tensor"
    w = view.const(node.inputs[1])
    if w is None:
        return "its weight is not a constant (computed in the graph, or an initializer that is also a graph input)"
    if w.dtype != np.float32:
        return f"its weight is {w.dtype}, not float32"
    if node.op == "Conv":
        return w, 0
    if w.ndim != 2:
        return f"its weight is {w.ndim}-D, not a 2-D matrix"
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA=1 is not quantized"
    return w, 0 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 1


def _activation(view: OnnxView, t: Any, floats: set[str]) -> bool:
    return t.name in floats and view.const(t) is None


def _tensorrt_points(view: OnnxView, layers: list, layer_nodes: set[int], floats: set[str]) -> dict:
    points: dict[str, tuple[Any, list]] = {}

    def add(t, reader):
        points.setdefault(t.name, (t, []))[1].append(reader)

    def from_layer(t: Any) -> bool:
        return bool(t.inputs) and id(t.inputs[0]) in layer_nodes

    def parents(t: Any) -> list:
        return [i for i in t.inputs[0].inputs if _activation(view, i, floats)] if t.inputs else []

    for node in layers:
        add(node.inputs[0], node)
    for node in view.candidates(frozenset({"Add"})):
        ins = node.inputs
        if len(ins) != 2 or not all(_activation(view, t, floats) for t in ins):
            continue
        skip = residual_skip(ins, from_layer, parents)
        if skip is not None:
            add(ins[skip], node)
    return points


def _ort_points(view: OnnxView, graph: gs.Graph, layer_nodes: set[int], floats: set[str]) -> dict:
    points: dict[str, tuple[Any, list]] = {}

    def add(t):
        if _activation(view, t, floats) and t.outputs and t.name not in points:
            points[t.name] = (t, list(t.outputs))

    for node in graph.nodes:
        if view.kind(node) not in ORT_OPS or (node.op in LAYERS and id(node) not in layer_nodes):
            continue
        for t in node.inputs:
            add(t)
        for t in node.outputs:
            while len(t.outputs) == 1 and t.outputs[0].op in FUSED_ACTIVATIONS and t not in graph.outputs:
                t = t.outputs[0].outputs[0]
            add(t)
    return points


def _same_grid(graph: gs.Graph, points: dict) -> dict[str, str]:
    """Point -> the point whose (scale, zero point) it reuses: the output of an op that only moves or selects values
    (MaxPool, Flatten, Reshape, ...) of a quantized input keeps the input's grid. Exact (max and moves commute with
    rounding), and onnxruntime then runs the op on the integers with no requantization."""
    out = {}
    tensors = graph.tensors()
    for name in points:
        t = tensors[name]
        producer = t.inputs[0] if t.inputs else None
        if producer is not None and producer.op in VALUE_MOVING and producer.inputs[0].name in points:
            out[name] = producer.inputs[0].name
    return out


def _calibrate(graph: gs.Graph, points: dict, batches: list[dict[str, np.ndarray]], make_observer
               ) -> tuple[dict, dict[str, str]]:
    """Run onnxruntime over the batches, observe each point (a point reusing another's grid takes its
    parameters), return ``({name: (scale, zero_point)}, {name: what the range guard did})``."""
    import onnxruntime as ort
    import torch
    from tqdm import tqdm

    same = _same_grid(graph, points)
    observers = {name: make_observer() for name in points if name not in same}
    if not observers:
        return {}, {}
    inputs = {t.name for t in graph.inputs}
    fetch = [n for n in observers if n not in inputs]
    probe = graph.copy()
    tensors = probe.tensors()
    probe.outputs = [tensors[n] for n in fetch]
    for t in probe.outputs:
        t.dtype = np.float32
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(gs.export_onnx(probe, do_type_check=False).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    for batch in tqdm(batches, desc="fake_quant: calibrating", unit="batch", disable=None, leave=False):
        values = dict(zip(fetch, sess.run(fetch, batch), strict=True)) if fetch else {}
        for name, obs in observers.items():
            obs.update(torch.from_numpy(np.ascontiguousarray(values[name] if name in values else batch[name])))
    out, guards = {}, {}
    for name, obs in observers.items():
        scale, zero_point = obs.qparams()
        out[name] = (np.float32(scale.item()), int(zero_point.item()))
        if getattr(obs, "guard", None):
            guards[name] = obs.guard
    for name in same:
        src = same[name]
        while src in same:
            src = same[src]
        out[name] = out[src]
    return out, guards


Names = Callable[[str], str]  # OnnxView.fresh_name


def _dq(graph: gs.Graph, names: Names, base: str, q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
        axis: int | None) -> gs.Variable:
    """Constant integer tensor -> DequantizeLinear -> a new float32 variable."""
    out = gs.Variable(names(f"{base}_dq"), dtype=np.float32, shape=list(q.shape))
    attrs = {} if axis is None else {"axis": axis}
    inputs = [gs.Constant(names(f"{base}_quantized"), q), gs.Constant(names(f"{base}_scale"), scale),
              gs.Constant(names(f"{base}_zero_point"), zero_point)]
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{base}_DequantizeLinear"), attrs, inputs, [out]))
    return out


def _quantize_weight(graph: gs.Graph, names: Names, node: gs.Node, w: np.ndarray, axis: int, bits: int,
                     per_channel: bool = True) -> np.ndarray:
    """Replace the layer's weight by int8 + DequantizeLinear, per output channel (or one scale for the tensor, then
    repeated per channel for the bias); return the scales (float64), one per output channel."""
    import torch

    from lkfx.quant.qparams import qparams, quant_range

    others = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=others).astype(np.float64)
    if not per_channel:
        amax = np.full_like(amax, amax.max())
    scale = qparams(-torch.from_numpy(amax), torch.from_numpy(amax), bits=bits, symmetric=True)[0].numpy()
    shape = [1] * w.ndim
    shape[axis] = -1
    qmin, qmax = quant_range(bits, True)
    q = np.clip(np.rint(w / scale.reshape(shape)), qmin, qmax).astype(np.int8)
    base = node.inputs[1].name
    if per_channel:
        node.inputs[1] = _dq(graph, names, base, q, scale, np.zeros_like(q, shape=scale.shape), axis)
    else:
        node.inputs[1] = _dq(graph, names, base, q, np.array(scale[0], np.float32), np.zeros((), np.int8), None)
    return scale.astype(np.float64)


def _quantize_bias(view: OnnxView, graph: gs.Graph, names: Names, node: gs.Node, scale: np.ndarray) -> None:
    """Bias as int32 with scale ``s_x * s_w`` (what onnxruntime's integer kernels read), when it is a plain vector."""
    t = view.optional_input(node, 2)
    b = view.const(t) if t is not None else None
    if b is None or b.shape != scale.shape or b.dtype != np.float32 or float(node.attrs.get("beta", 1.0)) != 1.0:
        return
    info = np.iinfo(np.int32)
    q = np.clip(np.rint(b / scale), info.min, info.max).astype(np.int32)
    node.inputs[2] = _dq(graph, names, t.name, q, scale.astype(np.float32), np.zeros(q.shape, np.int32), 0)


def _insert_qdq(graph: gs.Graph, names: Names, tensor: Any, readers: Iterable[gs.Node], scale: np.float32,
                zero_point: int, zp_type: type) -> None:
    """tensor -> QuantizeLinear -> DequantizeLinear -> each reader (other readers keep the float tensor)."""
    s = gs.Constant(names(f"{tensor.name}_scale"), np.array(scale, np.float32))
    z = gs.Constant(names(f"{tensor.name}_zero_point"), np.array(zero_point, zp_type))
    q = gs.Variable(names(f"{tensor.name}_q"), dtype=zp_type, shape=tensor.shape)
    dq = gs.Variable(names(f"{tensor.name}_dq"), dtype=np.float32, shape=tensor.shape)
    graph.nodes.append(gs.Node("QuantizeLinear", names(f"{tensor.name}_QuantizeLinear"), {}, [tensor, s, z], [q]))
    graph.nodes.append(gs.Node("DequantizeLinear", names(f"{tensor.name}_DequantizeLinear"), {}, [q, s, z], [dq]))
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is tensor:
                reader.inputs[i] = dq
