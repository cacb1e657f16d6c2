"""Demo (`make demo`): a train-form ONNX model into its deploy form, then into int8, with a before / after table.

`examples/data/repvgg_digits_train.onnx` is a small RepVGG / RepLKNet-style CNN trained on scikit-learn's digits
(`scripts/make_demo_model.py` regenerates it), exported with every branch and every BatchNorm kept: each block
is two or three parallel convs, each with its BN, summed. onnxruntime folds a BN into the conv before it but
never merges parallel branches, and PyTorch's exporters do neither for a block's branches. lkfx does both:

    lkfx optimize train.onnx -o deploy.onnx --check          # merge_reparam, then fold_bn: one conv per block
    lkfx optimize deploy.onnx -o int8.onnx -p fake_quant:method=kl,placement=ort --calib-data calib.npz

then every model runs in onnxruntime (one thread) on the 450 held-out digits: accuracy and latency. The
figures are this machine's: another CPU gives other latencies, and the int8 accuracy may differ by an image.
Needs only the `[onnx]` extra for the deploy form; the int8 step's calibration observers use torch.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from lkfx.cli import main as lkfx

DATA = Path(__file__).resolve().parent / "data"
REPEATS = 30


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def parameters(path: Path) -> int:
    return sum(int(np.prod(t.dims)) for t in onnx.load(str(path)).graph.initializer)


def measure(paths: dict[str, Path], x: np.ndarray, y: np.ndarray) -> dict[str, dict]:
    """Accuracy and the median latency of one run over all of `x`, the models timed in turn (interleaved)."""
    sessions = {name: session(p) for name, p in paths.items()}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(REPEATS):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, {"x": x})
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, path in paths.items():
        logits = sessions[name].run(None, {"x": x})[0]
        rows[name] = {"nodes": len(onnx.load(str(path)).graph.node), "parameters": parameters(path),
                      "bytes": path.stat().st_size, "ms": 1000 * float(np.median(times[name])),
                      "accuracy": 100 * float((logits.argmax(1) == y).mean())}
    return rows


def run(folder: Path) -> dict[str, dict]:
    data = np.load(DATA / "digits.npz")
    x, y = (data["x_test"][:, None] / np.float32(16)).astype(np.float32), data["y_test"]
    paths = {"train form": DATA / "repvgg_digits_train.onnx", "deploy form": folder / "deploy.onnx"}
    print("$ lkfx optimize repvgg_digits_train.onnx -o deploy.onnx --check")
    assert lkfx(["optimize", str(paths["train form"]), "-o", str(paths["deploy form"]), "--check"]) == 0
    if importlib.util.find_spec("torch") is None:
        print("\n(int8 step skipped: fake_quant's calibration observers need torch: pip install 'lkfx[torch]')")
    else:
        np.savez(folder / "calib.npz", x=(data["calib"][:, None] / np.float32(16)).astype(np.float32))
        paths["int8 (deploy + fake_quant)"] = folder / "int8.onnx"
        print("\n$ lkfx optimize deploy.onnx -o int8.onnx -p fake_quant:method=kl,placement=ort --calib-data calib.npz")
        assert lkfx(["optimize", str(paths["deploy form"]), "-o", str(paths["int8 (deploy + fake_quant)"]),
                     "-p", "fake_quant:method=kl,placement=ort", "--calib-data", str(folder / "calib.npz")]) == 0
    rows = measure(paths, x, y)
    print(f"\nonnxruntime, 1 thread, all {len(x)} test digits in one batch, median of {REPEATS} (this machine):")
    print(f"{'model':<28} {'nodes':>5} {'parameters':>10} {'bytes':>8} {'latency ms':>10} {'accuracy %':>10}")
    for name, r in rows.items():
        print(f"{name:<28} {r['nodes']:>5} {r['parameters']:>10,} {r['bytes']:>8,} {r['ms']:>10.2f} "
              f"{r['accuracy']:>10.2f}")
    return rows


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp))
