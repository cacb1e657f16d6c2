"""Loading, validating, saving and running ONNX models.

Every problem with the input is an `LkfxError` whose message says what is wrong and what to do; the input
file and the caller's ModelProto are never modified, and files are written atomically (temporary file in
the same folder, then rename), so a failure leaves no partial output.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError

from lkfx.errors import LkfxError

MIN_OPSET = 7
SYMBOLIC_SIZE = 16  # random_inputs: the size of a symbolic dimension that is neither batch nor conv channels
MAX_RANDOM_VALUES = 2**28  # random_inputs: values per input at most (1 GiB of float32)
_TWO_GB = 2**31 - 1
_PACKED_TYPES = {getattr(onnx.TensorProto, n) for n in ("STRING", "UNDEFINED", "INT4", "UINT4", "FLOAT4E2M1", "INT2",
                                                        "UINT2") if hasattr(onnx.TensorProto, n)}


def load(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Read and validate a model. A ModelProto is copied, never modified."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        base_dir = None
    else:
        path = Path(source)
        if not path.exists():
            raise LkfxError(f"input file '{path}' does not exist")
        if path.is_dir():
            raise LkfxError(f"input '{path}' is a directory; give the path of a .onnx file")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise LkfxError(f"cannot read '{path}': {e.strerror}") from e
        try:
            model = onnx.load_model_from_string(data)
        except (DecodeError, RuntimeError, ValueError) as e:
            if _looks_like_text(data):
                raise LkfxError(f"'{path}' is a text file, not an ONNX protobuf; give the binary .onnx file "
                                "(onnx.save or torch.onnx.export writes one)") from e
            raise LkfxError(f"'{path}' is not a valid ONNX file (protobuf parse failed: {e}); is it truncated?") from e
        base_dir = path.resolve().parent
        _load_external_data(model, base_dir)
    validate(model)
    return model


def _looks_like_text(data: bytes) -> bool:
    """Words in the first 4 KiB (a space, tab or newline) and no control bytes but those: a protobuf has some
    (the tag and length bytes of its first fields), a text file does not."""
    head = data[:4096]
    return any(c in head for c in b" \t\n") and not head.translate(None, b"\t\n\r" + bytes(range(32, 256)))


def default_mode() -> int:
    """The permission bits `open()` gives a new file: 0o666 less the umask (a temporary file gets 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def input_files(path: str | os.PathLike) -> set[Path]:
    """The model file and the external data files it names, resolved (what writing must not touch); just the
    path when it is not a readable model."""
    path = Path(path).resolve()
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # unreadable: `load` says why
        return {path}
    locations = {e.value for t in _all_tensors(model) for e in t.external_data if e.key == "location"}
    return {path, *((path.parent / loc).resolve() for loc in locations)}


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    for t in tensors:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise LkfxError(f"tensor '{t.name}' stores its data at '{location}', outside the model's folder; "
                            "refusing to read it (move the data file next to the model)")
        if not location or not target.is_file():
            raise LkfxError(f"tensor '{t.name}' needs external data file '{location}', which is missing or not a file")
    if tensors:
        try:
            load_external_data_for_model(model, str(base_dir))
        except (ValueError, OSError, onnx.checker.ValidationError) as e:  # offset / length past the end of the file
            raise LkfxError(f"cannot read the model's external data: {one_line(e)}; is the data file truncated?") \
                from e


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else f"{text[:limit]}..."


def validate(model: onnx.ModelProto) -> None:
    """Refuse what lkfx cannot rewrite safely, with the reason; `model` (lkfx's own copy) may be re-sorted."""
    if not model.graph.node and not model.graph.output:
        raise LkfxError("the ONNX model has an empty graph (no nodes, no outputs); is this really a model file?")
    _check_structure(model.graph)
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    newest = onnx.defs.onnx_opset_version()
    if default and not MIN_OPSET <= default[0] <= newest:
        raise LkfxError(f"model uses ONNX opset {default[0]}; lkfx supports opsets {MIN_OPSET}..{newest} "
                        "(convert it with onnx.version_converter)")
    _check_tensor_sizes(model.graph)
    if model.ByteSize() > _TWO_GB:
        return  # onnx.checker cannot hold it in memory; onnxruntime will still validate it when run
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise LkfxError(f"the input model fails onnx.checker: {one_line(e)}") from e


def _check_tensor_sizes(graph: onnx.GraphProto) -> None:
    """Initializers whose raw data is longer than their shape (onnx.checker catches only data that is too short)."""
    for t in graph.initializer:
        if not t.HasField("raw_data") or t.data_type in _PACKED_TYPES:
            continue
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        if len(t.raw_data) != math.prod(t.dims) * itemsize:
            raise LkfxError(f"initializer '{t.name}' has shape {list(t.dims)} ({math.prod(t.dims)} values) but "
                            f"{len(t.raw_data)} bytes of {itemsize}-byte values; the file is corrupt")


def _check_structure(graph: onnx.GraphProto) -> None:
    """Name what onnx.checker reports only as 'not topologically sorted': a node input nothing produces, a graph
    output nothing produces, a cycle. Acyclic graphs whose nodes are merely out of order are sorted."""
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output if o}
    given = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {""}
    in_order = True
    for i, node in enumerate(graph.node):
        for tensor in node.input:
            if tensor in given:
                continue
            if tensor not in producer:
                raise LkfxError(f"node {_node_name(graph, i)} reads '{tensor}', which no node, initializer or graph "
                                "input produces (a dangling input); fix the exporter or the graph edit that wrote it")
            in_order = in_order and producer[tensor] < i
    for out in graph.output:
        if out.name not in producer and out.name not in given:
            raise LkfxError(f"graph output '{out.name}' is produced by no node, initializer or graph input")
    if not in_order:
        _sort_nodes(graph, producer, given)


def _node_name(graph: onnx.GraphProto, i: int) -> str:
    node = graph.node[i]
    return f"'{node.name}'" if node.name else f"{node.op_type} #{i}"


def _sort_nodes(graph: onnx.GraphProto, producer: dict[str, int], given: set[str]) -> None:
    import networkx as nx

    deps = nx.DiGraph()
    deps.add_nodes_from(range(len(graph.node)))
    deps.add_edges_from((producer[t], i) for i, node in enumerate(graph.node) for t in node.input if t not in given)
    try:
        cycle = nx.find_cycle(deps)
    except nx.NetworkXNoCycle:
        nodes = [graph.node[i] for i in nx.lexicographical_topological_sort(deps)]
        del graph.node[:]
        graph.node.extend(nodes)
        return
    path = " -> ".join(_node_name(graph, a) for a, _ in cycle) + f" -> {_node_name(graph, cycle[0][0])}"
    raise LkfxError(f"the graph has a cycle ({path}); ONNX graphs must be acyclic")


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """Import into onnx-graphsurgeon. `graph.lkfx_overridable` names initializers that are also graph inputs
    (IR >= 4: the caller may feed other values), which passes must not treat as constants."""
    graph = gs.import_onnx(model)
    graph.lkfx_overridable = _initializer_inputs(model) if model.ir_version >= 4 else frozenset()
    return graph


def _initializer_inputs(model: onnx.ModelProto) -> frozenset[str]:
    inits = {t.name for t in model.graph.initializer}
    return frozenset(i.name for i in model.graph.input if i.name in inits)


def from_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export `graph` keeping the original model's opsets, IR version and metadata."""
    out = gs.export_onnx(graph, do_type_check=False)
    # graphsurgeon drops initializers from the graph inputs; put back those the original listed (IR < 4 requires
    # every initializer to be an input; IR >= 4 uses it to mark overridable values)
    listed = {i.name for i in out.graph.input}
    if like.ir_version < 4:
        out.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                               for t in out.graph.initializer if t.name not in listed)
    else:
        kept = {t.name for t in out.graph.initializer}
        out.graph.input.extend(i for i in like.graph.input if i.name in _initializer_inputs(like) & kept - listed)
    out.ir_version = like.ir_version
    added = [o for o in out.opset_import if o.domain not in {d.domain for d in like.opset_import}]
    del out.opset_import[:]
    out.opset_import.extend([*like.opset_import, *added])  # keep domains a pass introduced (plugin nodes)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, field, getattr(like, field))
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    del out.functions[:]
    out.functions.extend(like.functions)
    return out


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, mode: int | None = None) -> None:
    """Write `model` to `path` via a temporary file and rename; > 2 GB goes to `<name>.data` beside it.
    The files get permission bits `mode` (default: what `open()` would give, 0o666 less the umask)."""
    path = Path(path)
    mode = default_mode() if mode is None else mode
    if path.is_dir():
        raise LkfxError(f"output path '{path}' is a directory; give a file name such as '{path / 'model.onnx'}'")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise LkfxError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise LkfxError(f"output folder '{folder}' is not writable")
    big = model.ByteSize() > _TWO_GB
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise LkfxError(f"cannot write in output folder '{folder}': {e.strerror}") from e
    os.close(fd)
    data_name = f"{path.name}.data"
    try:
        if big:
            _save_external(model, Path(tmp), f"{Path(tmp).name}.data")
            os.chmod(f"{tmp}.data", mode)
            os.replace(f"{tmp}.data", folder / data_name)
            # point the model at the final data file name
            final = onnx.load_model(tmp, load_external_data=False)
            for t in _all_tensors(final):
                for e in t.external_data:
                    if e.key == "location":
                        e.value = data_name
            onnx.save_model(final, tmp)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise LkfxError(f"cannot write '{path}': {e.strerror or e}") from e
        raise


def _save_external(model: onnx.ModelProto, path: Path, location: str) -> None:
    """Save with the tensors in `location` beside `path`. onnx.save_model moves the tensors' bytes out of the
    proto it is given; they are read back, so the caller's model stays whole."""
    from onnx.external_data_helper import load_external_data_for_model

    unset = [t for t in _all_tensors(model) if not t.HasField("data_location")]
    onnx.save_model(model, str(path), save_as_external_data=True, location=location)
    load_external_data_for_model(model, str(path.parent))
    for t in unset:
        t.ClearField("data_location")


def stats(model: onnx.ModelProto) -> dict[str, Any]:
    itemsize = {}
    weights = 0
    for t in model.graph.initializer:
        if t.data_type not in itemsize:
            itemsize[t.data_type] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        weights += math.prod(t.dims) * itemsize[t.data_type]
    return {"nodes": len(model.graph.node), "weight_bytes": int(weights)}


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One random batch for the graph inputs. Symbolic or unknown dimensions: the batch (axis 0) is 1, the
    channels (axis 1) of an input a Conv reads are the Conv's input channels, any other is `SYMBOLIC_SIZE`."""
    rng = np.random.default_rng(seed)
    inits = {t.name: t for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise LkfxError(f"graph input '{inp.name}' is not a tensor; pass explicit inputs for the check")
        if not tt.HasField("shape"):
            raise LkfxError(f"graph input '{inp.name}' has no shape (unknown rank), so random inputs cannot be made "
                            "for the check; give the input a shape (or pass example inputs)")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else
                 1 if axis == 0 else _conv_channels(model, inp.name, inits) if axis == 1 else SYMBOLIC_SIZE
                 for axis, d in enumerate(tt.shape.dim)]
        if math.prod(shape) > MAX_RANDOM_VALUES:
            raise LkfxError(f"graph input '{inp.name}' has shape {shape}: too large for a random check input "
                            f"(more than {MAX_RANDOM_VALUES:,} values); check with smaller inputs")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def as_feeds(model: onnx.ModelProto, inputs: Any) -> dict[str, np.ndarray]:
    """`inputs` as ``{graph input name: array}``: a dict by name, or one array / tensor (or a sequence of them) for
    the graph inputs in order."""
    initializers = _initializer_inputs(model)
    names = [i.name for i in model.graph.input if i.name not in initializers]
    if not isinstance(inputs, dict):
        inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(inputs) != len(names):
            raise LkfxError(f"{len(inputs)} example input(s) for a graph with {len(names)} input(s) {names}: give one "
                            "array per graph input, in order, or a {name: array} dict")
        inputs = dict(zip(names, inputs, strict=True))
    unknown = sorted(set(inputs) - set(names))
    if unknown:
        raise LkfxError(f"example inputs {unknown} are not inputs of the graph; its inputs are {names}")
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v) for k, v in inputs.items()}


def precision_ratio(model: onnx.ModelProto) -> float:
    """How much coarser than float32 the model's float outputs are (float16: 8192, bfloat16: 65536, else 1): the
    passes' tolerances are for float32 and scale by this for a check (values are rounded to that precision)."""
    eps32 = float(np.finfo(np.float32).eps)
    ratio = 1.0
    for out in model.graph.output:
        elem = out.type.tensor_type.elem_type
        if elem == onnx.TensorProto.BFLOAT16:
            ratio = max(ratio, 2.0**-7 / eps32)
        elif elem == onnx.TensorProto.FLOAT16:
            ratio = max(ratio, float(np.finfo(np.float16).eps) / eps32)
    return ratio


def _conv_channels(model: onnx.ModelProto, name: str, inits: dict[str, onnx.TensorProto]) -> int:
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] == name and len(node.input) > 1 and node.input[1] in inits:
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            dims = inits[node.input[1]].dims
            if len(dims) > 1:
                return int(dims[1] * group)
    return SYMBOLIC_SIZE


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model` in onnxruntime on the CPU with all graph optimisations off (the graph as written).

    lkfx's own plugin nodes (`lower_dwconv`) run through `lkfx.backends.ort_ops`, onnxruntime having no kernel
    for them."""
    import onnxruntime as ort

    if any(n.domain == "lkfx" for n in model.graph.node):  # dwconv_op.PLUGIN_DOMAIN; that module needs torch
        from lkfx.backends import ort_ops

        return ort_ops.run(model, feeds)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if model.ByteSize() > _TWO_GB:
        with tempfile.TemporaryDirectory() as d:
            _save_external(model, Path(d) / "m.onnx", "m.onnx.data")
            sess = ort.InferenceSession(f"{d}/m.onnx", opts, providers=["CPUExecutionProvider"])
            return sess.run(None, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` computing in float64: float initializers, constant tensors (Constant, ConstantOfShape),
    Cast targets and the declared types of graph inputs, outputs and intermediate values become double."""
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type in _FLOATS:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name))

    for t in g.initializer:
        widen(t)
    for node in g.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                widen(a.t)
            elif node.op_type == "Cast" and a.name == "to" and a.i in _FLOATS:
                a.i = onnx.TensorProto.DOUBLE
    for v in (*g.input, *g.output, *g.value_info):
        if v.type.tensor_type.elem_type in _FLOATS:
            v.type.tensor_type.elem_type = onnx.TensorProto.DOUBLE
    return out


def run_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[list | None, str | None]:
    """`model` run in float64 (`to_float64`) on `feeds` widened to float64: in onnxruntime, else, where its CPU
    kernels lack float64 (Conv has none), in onnx's reference evaluator (numpy). Returns (outputs, None), or
    (None, why) when neither can run it."""
    wide = to_float64(model)
    feeds = {k: v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) else v for k, v in feeds.items()}
    try:
        return run(wide, feeds), None
    except Exception as e:  # onnxruntime: no float64 kernel for an op (NOT_IMPLEMENTED), or another refusal
        ort_error = one_line(e, 150)
    try:
        import warnings

        from onnx.reference import ReferenceEvaluator

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")  # e.g. overflow in the unused branch of Sigmoid
            return list(ReferenceEvaluator(wide).run(None, feeds)), None
    except Exception as e:  # an op the reference evaluator lacks (custom domains), a subgraph, ...
        return None, f"onnxruntime: {ort_error}; onnx reference evaluator: {one_line(e, 150)}"
