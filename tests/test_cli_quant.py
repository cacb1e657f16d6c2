"""`lkfx optimize -p fake_quant --calib-data PATH` end to end on the scikit-learn digits CNN.

Good data: the QDQ model is written, runs in onnxruntime and stays close to the float model on the real digits test
set (top-1 agreement >= 97 %, logits max relative error <= 0.1, the bound documented in
tests/passes/test_fake_quant_onnx.py). Bad data: exit 2, one line on stderr, no output file, the input untouched.
Also runs benchmarks/quant.py --quick.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ORT_INT8_WEIGHT_BITS, op_types
from passes.test_fake_quant_onnx import export_digits, run

from lkfx.cli import main
from lkfx.compare import max_rel_error
from lkfx.quant.observers import METHODS


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_quant")
    x_train, x_test, _ = export_digits(folder / "digits.onnx", epochs=4)
    np.savez(folder / "calib.npz", x=x_train[:256])
    (folder / "batches").mkdir()
    for i in range(4):
        np.save(folder / "batches" / f"batch{i}.npy", x_train[64 * i:64 * (i + 1)])
    return folder, x_test


def test_npz_calibration_writes_a_qdq_model_close_to_float(digits, tmp_path, capsys):
    folder, x_test = digits
    src, out, rep = folder / "digits.onnx", tmp_path / "int8.onnx", tmp_path / "report.json"
    argv = ["optimize", str(src), "-o", str(out), "-p", f"fake_quant:method=minmax,weight_bits={ORT_INT8_WEIGHT_BITS}",
            "--calib-data", str(folder / "calib.npz"), "--report", str(rep)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fold_bn folded 4 BatchNormalization" in printed and "calibrated with minmax on 1 batches" in printed
    assert "wrote" in printed
    model = onnx.load(str(out))
    assert "QuantizeLinear" in op_types(model) and "BatchNormalization" not in op_types(model)
    ref, got = run(onnx.load(str(src)), x_test), run(model, x_test)
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.97 and max_rel_error([ref], [got]) <= 0.1
    passes = json.loads(rep.read_text())["passes"]
    assert passes[0]["name"] == "fake_quant" and passes[0]["rewritten"] == 5


def test_check_runs_on_the_first_calibration_batch(digits, tmp_path, capsys):
    """--check compares on calibration data (random inputs fall outside the calibrated ranges) against the pass's
    documented bound (0.25 at 8 bits), and reports the error."""
    folder, _ = digits
    out, rep = tmp_path / "int8.onnx", tmp_path / "report.json"
    argv = ["optimize", str(folder / "digits.onnx"), "-o", str(out), "-p", "fake_quant", "--calib-data",
            str(folder / "batches"), "--check", "--report", str(rep)]
    assert main(argv) == 0
    check = json.loads(rep.read_text())["check"]
    assert check["passed"] and check["tolerance"] == 0.25 and check["max_rel_error"] < 0.1
    assert out.exists()


def test_folder_of_npy_batches_and_options(digits, tmp_path, capsys):
    folder, _ = digits
    out = tmp_path / "int8.onnx"
    argv = ["optimize", str(folder / "digits.onnx"), "-o", str(out), "-p",
            "fake_quant:method=percentile,placement=ort,num_batches=3", "--calib-data", str(folder / "batches")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "calibrated with percentile on 3 batches" in printed and "placement=ort: " in printed
    assert op_types(onnx.load(str(out))).count("QuantizeLinear") > 5


def test_calib_batch_size_cuts_all_samples_whatever_the_names(digits, tmp_path, capsys):
    """calib.npz (one array named like the input: one block) and batches/ (four arrays) give the same 8 batches."""
    folder, _ = digits
    for data in (folder / "calib.npz", folder / "batches"):
        argv = ["optimize", str(folder / "digits.onnx"), "-o", str(tmp_path / "int8.onnx"), "-p", "fake_quant",
                "--calib-data", str(data), "--calib-batch-size", "32"]
        assert main(argv) == 0
        assert "on 8 batches" in capsys.readouterr().out
    argv = ["optimize", str(folder / "digits.onnx"), "-o", str(tmp_path / "x.onnx"), "-p", "fake_quant",
            "--calib-batch-size", "32"]
    assert main(argv) == 2 and "--calib-batch-size needs" in capsys.readouterr().err


def _bad_data(folder, tmp):
    x = np.load(folder / "calib.npz")["x"]
    np.savez(tmp / "shape.npz", x=x[:, :, :4, :4])
    np.savez(tmp / "dtype.npz", x=x.astype(np.float64))
    np.savez(tmp / "name.npz", images=x, labels=np.zeros(len(x), np.float32))
    return {
        "shape": (tmp / "shape.npz", "dimension 2 differs"),
        "dtype": (tmp / "dtype.npz", "is float64, the model expects float32"),
        "labels saved too": (tmp / "name.npz", "has shape (256,), the model expects rank 4"),
        "too few batches": (folder / "batches", "holds 4 batches, fewer than num_batches=10"),
        "missing": (None, "needs calibration data"),
        "not data": (folder / "digits.onnx", "neither a .npz file nor a folder"),
    }


@pytest.mark.parametrize("case", ["shape", "dtype", "labels saved too", "too few batches", "missing", "not data"])
def test_bad_calibration_data_exits_2_with_one_line_and_writes_nothing(digits, tmp_path, capsys, case):
    folder, _ = digits
    path, message = _bad_data(folder, tmp_path)[case]
    src, out = folder / "digits.onnx", tmp_path / "int8.onnx"
    before = src.read_bytes()
    spec = "fake_quant:num_batches=10" if case == "too few batches" else "fake_quant"
    argv = ["optimize", str(src), "-o", str(out), "-p", spec] + (["--calib-data", str(path)] if path else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lkfx: error:") and message in err, err
    assert not out.exists() and src.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".int8.onnx")]  # no temporary file left


@pytest.mark.slow
def test_quant_benchmark_quick(tmp_path):
    """benchmarks/quant.py --quick runs end to end and writes its JSON and plot (numbers not asserted: timing)."""
    bench = Path(__file__).resolve().parent.parent / "benchmarks" / "quant.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--epochs", "2", "--runs", "3", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "quant.json").read_text())
    assert data["quick"] is True and len(data["goals"]) == 12 and (tmp_path / "quant.png").exists()
    for model in ("digits", "mobilenet_relu6", "large_kernel_31x31"):
        assert {f"lkfx {m}" for m in METHODS} | {"quantize_static Entropy", "fp32"} <= set(data[model])
        assert f"{model}: calibration time <= 1.5x the matching quantize_static method" in res.stdout
    assert "fallback=auto recovers minmax" in res.stdout and "resnet18 latency <= quantize_static" in res.stdout
