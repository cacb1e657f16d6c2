"""Hostile and broken ONNX input through the CLI: random bytes, truncated protobuf, cycles, dangling inputs,
unknown ops and domains, opsets out of range, symbolic shapes, non-float inputs, external data that escapes the
model's folder, a > 2 GB model (a small stand-in: the 2 GB limit lowered), output paths that cannot be written.

Each refusal is exit code 2 with exactly one line on stderr, every file in the folder byte-for-byte unchanged and
no new file (no partial output, no temporary file left). What lkfx handles instead (symbolic shapes, non-float
inputs, custom domains, external data inside the folder, > 2 GB) is rewritten and checked in onnxruntime.
Also: nothing in lkfx unpickles (torch.load only with weights_only=True, no pickle / np.load(allow_pickle=True)).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import conv_bn_chain, count

from lkfx.cli import main
from lkfx.compare import max_rel_error
from lkfx.graph import onnx as gonnx

ROOT = Path(__file__).resolve().parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refuse(tmp_path: Path, capsys, args: list[str], *words: str) -> str:
    """Run the CLI: exit 2, one line on stderr containing `words`, nothing under tmp_path changed or added."""
    before = snapshot(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("lkfx: error: "), err
    for w in words:
        assert w in err, err
    assert snapshot(tmp_path) == before, "input changed or output written"
    return err


def write(tmp_path: Path, model: onnx.ModelProto | bytes, name: str = "in.onnx") -> Path:
    path = tmp_path / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def optimize(src: Path, out: Path, *extra: str) -> list[str]:
    return ["optimize", str(src), "-o", str(out), "-p", "fold_bn", "-q", *extra]


def edited(edit) -> onnx.ModelProto:
    model = conv_bn_chain()
    edit(model)
    return model


# --- unreadable files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 100, 10_000])
def test_random_bytes(tmp_path, capsys, size):
    src = write(tmp_path, np.random.default_rng(size).bytes(size))
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx"), "not a valid ONNX file")


def test_empty_file(tmp_path, capsys):
    src = write(tmp_path, b"")
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx"), "empty graph")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_truncated_protobuf(tmp_path, capsys, keep):
    data = conv_bn_chain(c=16).SerializeToString()
    src = write(tmp_path, data[: int(len(data) * keep)])
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx"), "truncated")


# --- broken graphs ------------------------------------------------------------------------------------------
def _cycle(m):
    m.graph.node[0].input[0] = "r2"  # conv0 reads the last ReLU


def _dangling_node_input(m):
    m.graph.node[3].input[0] = "nowhere"


def _dangling_output(m):
    m.graph.output[0].name = "nowhere"


def _unknown_op(m):
    m.graph.node[2].op_type = "FrobnicateRelu"


def _undeclared_domain(m):
    m.graph.node[2].domain = "com.example"


def _opset(version):
    def edit(m):
        m.opset_import[0].version = version
    return edit


def _no_default_opset(m):
    del m.opset_import[:]


def _ir_too_new(m):
    m.ir_version = 99


def _weight_data_too_long(m):
    m.graph.initializer[0].dims[:] = [4, 4, 3]


def _weight_data_too_short(m):
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:10]


BROKEN = {
    "cycle": (_cycle, ["cycle", "'conv0' -> 'bn0'", "acyclic"]),
    "dangling node input": (_dangling_node_input, ["'conv1' reads 'nowhere'", "dangling"]),
    "dangling graph output": (_dangling_output, ["graph output 'nowhere'"]),
    "unknown op": (_unknown_op, ["FrobnicateRelu"]),
    "undeclared domain": (_undeclared_domain, ["com.example"]),
    "opset older than supported": (_opset(6), ["opset 6", "version_converter"]),
    "opset newer than supported": (_opset(onnx.defs.onnx_opset_version() + 1), ["supports opsets"]),
    "opset far in the future": (_opset(99), ["opset 99"]),
    "no default opset": (_no_default_opset, ["opset_import"]),
    "IR version too new": (_ir_too_new, ["ir_version 99"]),
    "initializer data longer than its shape": (_weight_data_too_long, ["'w0' has shape [4, 4, 3]", "corrupt"]),
    "initializer data shorter than its shape": (_weight_data_too_short, ["'w0'", "10 bytes"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
@pytest.mark.parametrize("command", ["optimize", "inspect"])
def test_broken_graph(tmp_path, capsys, case, command):
    edit, words = BROKEN[case]
    src = write(tmp_path, edited(edit))
    args = optimize(src, tmp_path / "out.onnx", "--check") if command == "optimize" else ["inspect", str(src)]
    refuse(tmp_path, capsys, args, *words)


def test_nodes_out_of_order_are_sorted(tmp_path):
    """An acyclic graph whose nodes are listed out of order (onnx.checker refuses it) is sorted and rewritten."""
    model = conv_bn_chain()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    src, out = write(tmp_path, model), tmp_path / "out.onnx"
    assert main(optimize(src, out, "--check")) == 0
    assert count(onnx.load(str(out)), "BatchNormalization") == 0


def test_custom_domain_passes_through_and_cannot_be_checked(tmp_path, capsys):
    """Ops of a declared custom domain are kept as they are; --check needs onnxruntime to run them: exit 2."""
    model = edited(_undeclared_domain)
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    src, out = write(tmp_path, model), tmp_path / "out.onnx"
    refuse(tmp_path, capsys, optimize(src, out, "--check"), "onnxruntime cannot run the input model", "com.example")
    assert main(optimize(src, out)) == 0
    result = onnx.load(str(out))
    assert [n.domain for n in result.graph.node if n.op_type == "Relu"].count("com.example") == 1
    assert count(result, "BatchNormalization") == 0


def test_control_flow_subgraphs_are_left_alone(tmp_path):
    """Conv + BN inside If branches: the passes rewrite the main graph only; the subgraphs stay and the result is
    the same in onnxruntime on both branches."""
    rng = np.random.default_rng(0)
    shape = [1, 4, 6, 6]

    def branch(name):
        conv = helper.make_node("Conv", ["x", f"W{name}"], [f"c{name}"], pads=[1, 1, 1, 1], name=f"conv{name}")
        bn = helper.make_node("BatchNormalization", [f"c{name}", f"s{name}", f"b{name}", f"m{name}", f"v{name}"],
                              [f"y{name}"], name=f"bn{name}")
        inits = [numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32), f"W{name}")]
        inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), f"{k}{name}") for k in "sbmv"]
        return helper.make_graph([conv, bn], name, [], [helper.make_tensor_value_info(f"y{name}", 1, shape)], inits)

    node = helper.make_node("If", ["cond"], ["y"], then_branch=branch("a"), else_branch=branch("b"), name="if")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src, out = write(tmp_path, model), tmp_path / "out.onnx"
    assert main(optimize(src, out, "-p", "merge_reparam", "--check")) == 0
    result = onnx.load(str(out))
    assert result.graph.node[0].op_type == "If"
    for cond in (True, False):
        feeds = {"x": rng.standard_normal(shape).astype(np.float32), "cond": np.array(cond)}
        assert max_rel_error(gonnx.run(model, feeds), gonnx.run(result, feeds)) == 0


# --- shapes and types ---------------------------------------------------------------------------------------
def _symbolic(model, names=("N", "C", "H", "W")):
    for value in (model.graph.input[0], model.graph.output[0]):
        for dim, name in zip(value.type.tensor_type.shape.dim, names, strict=True):
            dim.Clear()
            if name:
                dim.dim_param = name
    return model


@pytest.mark.parametrize("names", [("N", "C", "H", "W"), ("batch", None, None, None), (None, None, None, None)],
                         ids=["symbolic", "symbolic batch, unknown rest", "unknown"])
def test_dynamic_and_symbolic_shapes_are_checked(tmp_path, names):
    """Symbolic / unknown dimensions stay as they are; the check feeds batch 1, the first Conv's channels and
    gonnx.SYMBOLIC_SIZE for the rest."""
    src, out, rep = write(tmp_path, _symbolic(conv_bn_chain(hw=8), names)), tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(optimize(src, out, "--check", "--report", str(rep))) == 0
    result = onnx.load(str(out))
    assert count(result, "BatchNormalization") == 0
    assert [d.dim_param for d in result.graph.input[0].type.tensor_type.shape.dim] == [n or "" for n in names]
    assert json.loads(rep.read_text())["check"]["passed"] is True
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 4, 13, 11)).astype(np.float32)}
    assert max_rel_error(gonnx.run(onnx.load(str(src)), feeds), gonnx.run(result, feeds)) <= 1e-5


def test_huge_declared_input_is_not_allocated_for_the_check(tmp_path, capsys):
    model = conv_bn_chain()
    for value in (model.graph.input[0], model.graph.output[0]):
        for dim, size in zip(value.type.tensor_type.shape.dim, [1, 4, 100_000, 100_000], strict=True):
            dim.dim_value = size
    src = write(tmp_path, model)
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx", "--check"), "too large for a random check input")


def test_unknown_rank_cannot_be_checked(tmp_path, capsys):
    model = conv_bn_chain()
    model.graph.input[0].type.tensor_type.ClearField("shape")
    src = write(tmp_path, model)
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx", "--check"), "onnx.checker", "shape")


def _cast_input(elem_type):
    model = conv_bn_chain()
    model.graph.input[0].name = "raw"
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    model.graph.node.insert(0, helper.make_node("Cast", ["raw"], ["x"], name="cast", to=TensorProto.FLOAT))
    return model


@pytest.mark.parametrize("elem_type", [TensorProto.INT64, TensorProto.UINT8, TensorProto.BOOL])
def test_non_float_input_is_handled(tmp_path, elem_type):
    src, out = write(tmp_path, _cast_input(elem_type)), tmp_path / "out.onnx"
    assert main(optimize(src, out, "--check")) == 0
    result = onnx.load(str(out))
    assert result.graph.input[0].type.tensor_type.elem_type == elem_type
    assert count(result, "BatchNormalization") == 0


def _retyped(model, elem_type):
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = elem_type
    return model


def test_float16_model_checked_at_float16_precision(tmp_path):
    src, out, rep = write(tmp_path, _retyped(conv_bn_chain(), TensorProto.FLOAT16)), tmp_path / "o.onnx", tmp_path / "r"
    assert main(optimize(src, out, "--check", "--report", str(rep))) == 0
    check = json.loads(rep.read_text())["check"]
    assert check["tolerance"] == pytest.approx(1e-5 * 2.0**-10 / 2.0**-23) and check["passed"]
    assert count(onnx.load(str(out)), "BatchNormalization") == 0


def test_model_onnxruntime_cannot_run_is_not_checked(tmp_path, capsys):
    """float64 Conv has no onnxruntime CPU kernel: the check cannot run the input (exit 2); without it, it folds."""
    src, out = write(tmp_path, _retyped(conv_bn_chain(), TensorProto.DOUBLE)), tmp_path / "out.onnx"
    refuse(tmp_path, capsys, optimize(src, out, "--check"), "onnxruntime cannot run the input model")
    assert main(optimize(src, out)) == 0
    assert count(onnx.load(str(out)), "BatchNormalization") == 0


def test_non_float_input_into_conv_cannot_be_checked(tmp_path, capsys):
    model = conv_bn_chain()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    src = write(tmp_path, model)
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx", "--check"), "onnxruntime cannot run")


# --- external data ------------------------------------------------------------------------------------------
@pytest.fixture
def external(tmp_path) -> Path:
    """tmp_path/model/ext.onnx with every tensor in tmp_path/model/ext.data, and a copy of the data outside."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save_model(conv_bn_chain(c=8), str(folder / "ext.onnx"), save_as_external_data=True, location="ext.data",
                    size_threshold=0)
    (tmp_path / "outside.data").write_bytes((folder / "ext.data").read_bytes())
    return folder / "ext.onnx"


def _relocated(path: Path, location: str, name: str, offset: str | None = None) -> Path:
    model = onnx.load_model(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
            if e.key == "offset" and offset is not None:
                e.value = offset
    onnx.save_model(model, str(path.parent / name))
    return path.parent / name


def test_external_data_inside_the_folder_is_read(tmp_path, external):
    out = tmp_path / "model" / "out.onnx"
    assert main(optimize(external, out, "--check")) == 0
    assert count(onnx.load(str(out)), "BatchNormalization") == 0


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, capsys, external, case):
    if case == "symlink":
        (external.parent / "link.data").symlink_to(tmp_path / "outside.data")
    location = {"dotdot": "../outside.data", "absolute": str(tmp_path / "outside.data"), "symlink": "link.data"}[case]
    src = _relocated(external, location, f"{case}.onnx")
    refuse(tmp_path, capsys, optimize(src, tmp_path / "model" / "out.onnx"), "outside the model's folder")


@pytest.mark.parametrize("case", ["missing", "folder", "truncated", "offset past the end"])
def test_external_data_missing_or_short_is_refused(tmp_path, capsys, external, case):
    data = external.parent / "ext.data"
    if case == "truncated":
        (external.parent / "short.data").write_bytes(data.read_bytes()[:100])
    location = {"missing": "nope.data", "folder": ".", "truncated": "short.data"}.get(case, "ext.data")
    src = _relocated(external, location, "bad.onnx", offset="99999999" if case == "offset past the end" else None)
    words = ["missing or not a file"] if case in ("missing", "folder") else ["external data", "truncated"]
    refuse(tmp_path, capsys, optimize(src, tmp_path / "model" / "out.onnx"), *words)


@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_writing_over_the_inputs_data_file_is_refused(tmp_path, capsys, external, flag):
    data = external.parent / "ext.data"
    args = optimize(external, tmp_path / "out.onnx") + [flag, str(data)]
    refuse(tmp_path, capsys, args, "the input file or one of its data files")


def test_over_2gb_model_with_external_data(tmp_path, capsys, external, monkeypatch):
    """The > 2 GB route with a small stand-in: the same structure (weights in an external data file beside the
    model), the 2 GB limit lowered to 1 KB. lkfx reads the data, skips onnx.checker (which cannot hold > 2 GB),
    checks in onnxruntime through a temporary external-data copy and writes out.onnx + out.onnx.data."""
    monkeypatch.setattr(gonnx, "_TWO_GB", 1024)
    before = snapshot(external.parent)
    out = tmp_path / "result" / "out.onnx"
    out.parent.mkdir()
    assert main(optimize(external, out, "--check")) == 0
    assert snapshot(external.parent) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx", "out.onnx.data"]
    monkeypatch.undo()
    result = onnx.load(str(out))
    assert count(result, "BatchNormalization") == 0
    original = onnx.load(str(external))
    feeds = gonnx.random_inputs(original)
    assert max_rel_error(gonnx.run(original, feeds), gonnx.run(result, feeds)) <= 1e-5


def test_saving_a_large_model_keeps_the_proto_whole(tmp_path, monkeypatch):
    """onnx.save_model(save_as_external_data=True) empties the tensors of the proto it saves: lkfx's large-model
    save and run must leave the caller's proto as it was."""
    monkeypatch.setattr(gonnx, "_TWO_GB", 1024)
    model = conv_bn_chain(c=16)
    before = model.SerializeToString()
    gonnx.save_atomic(model, tmp_path / "m.onnx")
    gonnx.run(model, gonnx.random_inputs(model))
    assert model.SerializeToString() == before


# --- output paths -------------------------------------------------------------------------------------------
@pytest.fixture
def src(tmp_path) -> Path:
    return write(tmp_path, conv_bn_chain())


def test_output_is_a_directory(tmp_path, capsys, src):
    refuse(tmp_path, capsys, optimize(src, tmp_path), "is a directory")


def test_output_folder_not_writable(tmp_path, capsys, src):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; test_output_on_a_read_only_file_system covers it")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refuse(tmp_path, capsys, optimize(src, locked / "out.onnx"), "cannot write")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_on_a_read_only_file_system(tmp_path, capsys, src):
    refuse(tmp_path, capsys, optimize(src, Path("/proc/lkfx-out.onnx")), "cannot write '/proc/lkfx-out.onnx'")


@pytest.mark.parametrize("where", ["directory", "read-only"])
def test_unwritable_report_writes_no_model(tmp_path, capsys, src, where):
    report = tmp_path if where == "directory" else Path("/proc/lkfx-report.json")
    if where == "read-only" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc")
    refuse(tmp_path, capsys, optimize(src, tmp_path / "out.onnx", "--report", str(report)), "report" if
           where == "directory" else "cannot write")


@pytest.mark.parametrize("case", ["random bytes", "cycle"])
def test_process_exit_code_and_single_line(tmp_path, case):
    """The same through a real `python -m lkfx` process: exit status 2, one line, no traceback."""
    data = np.random.default_rng(0).bytes(500) if case == "random bytes" else edited(_cycle).SerializeToString()
    src = write(tmp_path, data)
    res = subprocess.run([sys.executable, "-m", "lkfx", *optimize(src, tmp_path / "out.onnx")], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out.onnx").exists()


# --- no pickles -------------------------------------------------------------------------------------------
def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _pickle_loads(tree: ast.AST) -> list[str]:
    """Calls that can unpickle: pickle / dill / joblib / cloudpickle loads, torch.load without weights_only=True,
    np.load / numpy.load with allow_pickle other than False, pandas.read_pickle."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        where = f"line {node.lineno}: {ast.unparse(node)[:80]}"
        if func.split(".")[-1] in ("load", "loads", "Unpickler") and \
                func.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "_pickle"):
            found.append(where)
        elif func.endswith("read_pickle"):
            found.append(where)
        elif func in ("torch.load", "torch.serialization.load"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(where)
        elif func in ("np.load", "numpy.load"):
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(where)
    return found


def test_nothing_in_lkfx_unpickles():
    offenders = {}
    for path in sorted((ROOT / "lkfx").rglob("*.py")):
        found = _pickle_loads(ast.parse(path.read_text(), str(path)))
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert not offenders, offenders


def test_the_pickle_scan_finds_what_it_looks_for():
    code = ("import pickle, torch, numpy as np\npickle.load(f)\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
            "np.load(p, allow_pickle=True)\nimport pandas\npandas.read_pickle(p)\n"
            "torch.load(p, weights_only=True)\nnp.load(p)\nnp.load(p, allow_pickle=False)\n")
    assert [w.split(":")[0] for w in _pickle_loads(ast.parse(code))] == [f"line {i}" for i in (2, 3, 4, 5, 7)]
