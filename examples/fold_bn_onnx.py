"""End to end: an ONNX file with BatchNorm in, fold_bn, checked, smaller and faster out.

    python examples/fold_bn_onnx.py [--out DIR]

1. builds torchvision's ResNet-18 (random weights, random BN statistics) and exports it to ONNX with
   BatchNormalization nodes kept, as a training-oriented export would;
2. runs `lkfx.transform(path, ["fold_bn"], check=True)`: onnxruntime compares both models on random input;
3. prints node counts, file sizes and onnxruntime CPU latency before and after, with onnxruntime's own graph
   optimisations off (what a runtime without BN fusion pays) and at their default level.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

import lkfx
from lkfx.graph.onnx import save_atomic


def export_resnet18(path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter keeps BN as-is
    torch.onnx.export(model, (torch.randn(1, 3, 112, 112),), str(path), dynamo=False, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, input_names=["image"], output_names=["logits"])


def latency_ms(path: Path, level: ort.GraphOptimizationLevel, runs: int = 30) -> float:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {"image": np.random.default_rng(0).standard_normal((1, 3, 112, 112), dtype=np.float32)}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for the .onnx files (default: a temp folder)")
    args = parser.parse_args()
    folder = args.out or Path(tempfile.mkdtemp(prefix="lkfx-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    src, dst = folder / "resnet18.onnx", folder / "resnet18.fold_bn.onnx"

    export_resnet18(src)
    optimized, report = lkfx.transform(src, ["fold_bn"], check=True, return_report=True)
    save_atomic(optimized, dst)
    print(report)
    print()

    before, after = onnx.load(str(src)), onnx.load(str(dst))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    levels = {"ORT optimisations off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "ORT default (all)": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    rows = [("", "before", "after"),
            ("nodes", str(len(before.graph.node)), str(len(after.graph.node))),
            ("BatchNormalization", str(count(before, "BatchNormalization")), str(count(after, "BatchNormalization"))),
            ("file size (KiB)", f"{src.stat().st_size / 1024:,.0f}", f"{dst.stat().st_size / 1024:,.0f}")]
    for name, level in levels.items():
        rows.append((f"latency, {name} (ms)", f"{latency_ms(src, level):.2f}", f"{latency_ms(dst, level):.2f}"))
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:<{width}}  {r[1]:>10}  {r[2]:>10}")
    print(f"\nchecked in onnxruntime: max relative error {report.check['max_rel_error']:.2e}; files in {folder}")


if __name__ == "__main__":
    main()
