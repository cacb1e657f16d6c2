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


def test_deploy_demo_with_torch(tmp_path):
    """`make demo`'s example: train form -> deploy form (exact) -> int8, measured in onnxruntime."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        import deploy_onnx
    finally:
        sys.path.remove(str(EXAMPLES))
    rows = deploy_onnx.run(tmp_path)
    train, deploy, int8 = rows.values()
    assert deploy["nodes"] < train["nodes"] / 2 and deploy["parameters"] < train["parameters"]
    assert deploy["accuracy"] == train["accuracy"] >= 90
    assert int8["bytes"] < deploy["bytes"] / 2 and abs(int8["accuracy"] - deploy["accuracy"]) <= 2


def test_deploy_demo_needs_no_torch():
    """With the [onnx] extra only (torch made unimportable), the deploy half runs and the int8 half says why not."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"runpy.run_path({str(EXAMPLES / 'deploy_onnx.py')!r}, run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "deploy form" in res.stdout and "int8 step skipped" in res.stdout
