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
_TWO_GB = 2**31 - 1


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
            model = onnx.load_model_from_string(path.read_bytes())
        except (DecodeError, RuntimeError, ValueError) as e:
            raise LkfxError(f"'{path}' is not a valid ONNX file (protobuf parse failed: {e}); is it truncated?") from e
        base_dir = path.resolve().parent
        _load_external_data(model, base_dir)
    validate(model)
    return model


def _load_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    tensors = [t for t in _all_tensors(model) if uses_external_data(t)]
    for t in tensors:
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (base_dir / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base_dir):
            raise LkfxError(f"tensor '{t.name}' stores its data at '{location}', outside the model's folder; "
                            "refusing to read it (move the data file next to the model)")
        if not target.is_file():
            raise LkfxError(f"tensor '{t.name}' needs external data file '{location}', which is missing")
    if tensors:
        load_external_data_for_model(model, str(base_dir))


def _all_tensors(model: onnx.ModelProto):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def validate(model: onnx.ModelProto) -> None:
    if not model.graph.node and not model.graph.output:
        raise LkfxError("the ONNX model has an empty graph (no nodes, no outputs); is this really a model file?")
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    newest = onnx.defs.onnx_opset_version()
    if default and not MIN_OPSET <= default[0] <= newest:
        raise LkfxError(f"model uses ONNX opset {default[0]}; lkfx supports opsets {MIN_OPSET}..{newest} "
                        "(convert it with onnx.version_converter)")
    if model.ByteSize() > _TWO_GB:
        return  # onnx.checker cannot hold it in memory; onnxruntime will still validate it when run
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0]
        raise LkfxError(f"the input model fails onnx.checker: {first}") from e


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


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write `model` to `path` via a temporary file and rename; > 2 GB goes to `<name>.data` beside it."""
    path = Path(path)
    if path.is_dir():
        raise LkfxError(f"output path '{path}' is a directory; give a file name such as '{path / 'model.onnx'}'")
    folder = path.resolve().parent
    if not folder.is_dir():
        raise LkfxError(f"output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise LkfxError(f"output folder '{folder}' is not writable")
    big = model.ByteSize() > _TWO_GB
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    data_name = f"{path.name}.data"
    try:
        if big:
            onnx.save_model(model, tmp, save_as_external_data=True, location=f"{Path(tmp).name}.data")
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)
        raise


def stats(model: onnx.ModelProto) -> dict[str, Any]:
    itemsize = {}
    weights = 0
    for t in model.graph.initializer:
        if t.data_type not in itemsize:
            itemsize[t.data_type] = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        weights += math.prod(t.dims) * itemsize[t.data_type]
    return {"nodes": len(model.graph.node), "weight_bytes": int(weights)}


def random_inputs(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """One random batch for the graph inputs; symbolic or unknown dimensions become 1."""
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise LkfxError(f"graph input '{inp.name}' is not a tensor; pass explicit inputs for the check")
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in tt.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = np.zeros(shape, dtype=dtype)
    return feeds


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run `model` in onnxruntime on the CPU with all graph optimisations off (the graph as written)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    if model.ByteSize() > _TWO_GB:
        with tempfile.TemporaryDirectory() as d:
            onnx.save_model(model, f"{d}/m.onnx", save_as_external_data=True)
            sess = ort.InferenceSession(f"{d}/m.onnx", opts, providers=["CPUExecutionProvider"])
            return sess.run(None, feeds)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
