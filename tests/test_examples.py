"""Examples run end to end as a user would run them."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_fold_bn_onnx_example(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLES / "fold_bn_onnx.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "BatchNormalization" in res.stdout and "max relative error" in res.stdout
    assert (tmp_path / "resnet18.onnx").exists() and (tmp_path / "resnet18.fold_bn.onnx").exists()


def test_fold_bn_benchmark_quick():
    bench = EXAMPLES.parent / "benchmarks" / "fold_bn_onnx.py"
    res = subprocess.run([sys.executable, str(bench), "--quick", "--repeats", "1"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert "lkfx / onnxscript rewriter" in res.stdout
