"""The `lkfx` command line: optimize / passes / inspect, exit codes, bad input that loses nothing."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx_models import conv_bn_chain, count

from lkfx.cli import main
from lkfx.compare import max_rel_error
from lkfx.graph.onnx import random_inputs, run


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(conv_bn_chain(), str(path))
    return path


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("lkfx: error:")
    for w in words:
        assert w in err, err
    return err


def test_optimize_writes_checked_model_and_report(tmp_path, model_path, capsys):
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    assert main(["optimize", str(model_path), "-o", str(out), "-p", "fold_bn", "--check", "--report", str(rep)]) == 0
    printed = capsys.readouterr().out
    assert "fold_bn" in printed and "rewritten" in printed and "wrote" in printed
    optimized = onnx.load(str(out))
    onnx.checker.check_model(optimized)
    assert count(optimized, "BatchNormalization") == 0 and count(optimized, "Conv") == 3
    original = onnx.load(str(model_path))
    feeds = random_inputs(original, seed=3)
    assert max_rel_error(run(original, feeds), run(optimized, feeds)) <= 1e-5
    data = json.loads(rep.read_text())
    assert data["passes"][0]["name"] == "fold_bn" and data["passes"][0]["rewritten"] == 3
    assert data["check"]["passed"] is True and data["output"] == str(out)


def test_pass_options_on_the_command_line(tmp_path, model_path):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "-p", "fold_bn:before=false", "-q"]) == 0
    assert count(onnx.load(str(out)), "BatchNormalization") == 0


def test_python_dash_m_and_console_script(tmp_path, model_path):
    out = tmp_path / "out.onnx"
    res = subprocess.run([sys.executable, "-m", "lkfx", "optimize", str(model_path), "-o", str(out), "-p", "fold_bn"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.exists()
    res = subprocess.run([sys.executable, "-m", "lkfx", "passes"], capture_output=True, text=True)
    assert res.returncode == 0 and "fold_bn" in res.stdout


def test_passes_json(capsys):
    assert main(["passes", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    fold = next(i for i in infos if i["name"] == "fold_bn")
    assert fold["frontends"] == ["fx", "onnx"] and fold["options"] == {"before": True}


def test_inspect_writes_nothing(tmp_path, model_path, capsys):
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "fold_bn" in out and "3" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_failed_check_writes_nothing_and_exits_1(tmp_path, model_path, capsys):
    from lkfx import Pass, register_pass

    @register_pass
    class BreakConv(Pass):  # a deliberately wrong "exact" pass, to see --check catch it
        name = "test_break_conv"
        summary = "negate every conv weight (wrong on purpose)"

        def run_onnx(self, graph, ctx):
            import onnx_graphsurgeon as gs

            for node in graph.nodes:
                if node.op == "Conv":
                    w = node.inputs[1]
                    node.inputs[1] = gs.Constant(w.name + "_neg", -np.asarray(w.values))
                    ctx.report.rewritten += 1

    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    code = main(["optimize", str(model_path), "-o", str(out), "-p", "test_break_conv", "--check", "--report", str(rep)])
    assert code == 1
    assert "check failed" in capsys.readouterr().err
    assert not out.exists() and not rep.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


BAD_INPUTS = {
    "missing file": (lambda d: d / "missing.onnx", "does not exist"),
    "not an onnx file": (lambda d: (d / "text.onnx").write_text("this is not a model") and d / "text.onnx",
                         "text file, not an ONNX protobuf"),
    "directory": (lambda d: d, "directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exit_2(tmp_path, capsys, case):
    make, words = BAD_INPUTS[case]
    src = make(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(src), "-o", str(out), "-p", "fold_bn"]) == 2
    _one_line_error(capsys, words)
    assert not out.exists()


def test_truncated_file_exit_2_input_untouched(tmp_path, model_path, capsys):
    data = model_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    snapshot = cut.read_bytes()
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(cut), "-o", str(out), "-p", "fold_bn"]) == 2
    _one_line_error(capsys)
    assert cut.read_bytes() == snapshot and not out.exists()


def test_output_equal_to_input_exit_2(model_path, capsys):
    snapshot = model_path.read_bytes()
    assert main(["optimize", str(model_path), "-o", str(model_path), "-p", "fold_bn"]) == 2
    _one_line_error(capsys, "is the input file")
    assert model_path.read_bytes() == snapshot


@pytest.mark.parametrize("spec,words", [("no_such_pass", ["unknown pass", "fold_bn"]),
                                        ("fold_bn:nope=1", ["no option", "before"]),
                                        ("fold_bn:before=3", ["true or false"]),
                                        ("fold_bn:before", ["key=value"])])
def test_unknown_pass_or_option_exit_2(tmp_path, model_path, capsys, spec, words):
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(model_path), "-o", str(out), "-p", spec]) == 2
    _one_line_error(capsys, *words)
    assert not out.exists()


def test_usage_errors_exit_2(capsys):
    assert main(["optimize"]) == 2
    _one_line_error(capsys, "required")
    assert main(["frobnicate"]) == 2
    _one_line_error(capsys)


def test_output_into_missing_folder_exit_2(tmp_path, model_path, capsys):
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "no" / "such" / "out.onnx"), "-p", "fold_bn"]) == 2
    _one_line_error(capsys, "does not exist")


def test_calib_data_without_a_pass_that_uses_it(tmp_path, model_path, capsys):
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((1, 4, 8, 8), np.float32))
    assert main(["optimize", str(model_path), "-o", str(tmp_path / "o.onnx"), "-p", "fold_bn",
                 "--calib-data", str(data)]) == 2
    _one_line_error(capsys, "calibration")
