"""The ConvNeXt -> RepLK example and the reparam benchmark's quick mode, run as a user would run them."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_convnext_to_replk_example(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "convnext_to_replk.py"), "--size", "64",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "18 of 18 depthwise convs swapped" in res.stdout and "18 blocks merged" in res.stdout
    errors = [float(line.rsplit(" ", 1)[1]) for line in res.stdout.splitlines() if "max relative error" in line]
    assert len(errors) == 3 and max(errors) <= 1e-5, res.stdout
    assert (tmp_path / "convnext_tiny_replk31.onnx").exists()


def test_reparam_benchmark_quick():
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reparam.py"), "--quick", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "5 blocks merged" in res.stdout and "ONNX fold_bn + merge_reparam" in res.stdout
