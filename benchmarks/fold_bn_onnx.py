"""fold_bn on ONNX: lkfx vs onnxoptimizer vs the onnxscript rewriter vs onnxruntime, load to save, one run.

    python benchmarks/fold_bn_onnx.py [--quick] [--repeats R]

The model is a chain of N x (Conv 3x3 -> BatchNormalization -> Relu), 8 channels. Each tool loads the file,
folds BN into the convs and saves the result, in this process; the median of R repeats is reported, and the
output is checked to contain no BatchNormalization. onnxoptimizer's fuse_bn_into_conv grows super-linearly, so
it only runs up to a few hundred blocks.

Goals (issue 2): at N = 5000 lkfx takes <= 0.6x the onnxscript rewriter's time, and lkfx's
time(5000) / time(500) <= 12 (linear scaling).
Writes benchmarks/results/fold_bn_onnx.json and .png.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from onnx_models import conv_bn_chain  # noqa: E402  (the tests' model, so both measure one graph)

RESULTS = Path(__file__).parent / "results"
ONNXOPTIMIZER_MAX_N = 300


def run_lkfx(src: str, dst: str) -> None:
    import lkfx
    from lkfx.graph.onnx import save_atomic

    save_atomic(lkfx.transform(src, ["fold_bn"]), dst)


def run_onnxoptimizer(src: str, dst: str) -> None:
    import onnxoptimizer

    onnx.save(onnxoptimizer.optimize(onnx.load(src), ["fuse_bn_into_conv"]), dst)


def run_onnxscript(src: str, dst: str) -> None:
    import onnx_ir as ir
    from onnxscript import rewriter
    from onnxscript.rewriter.rules.common import fuse_batchnorm_into_conv_rule

    model = ir.load(src)
    model = rewriter.rewrite(model, pattern_rewrite_rules=rewriter.RewriteRuleSet([fuse_batchnorm_into_conv_rule]))
    ir.save(model, dst)


def run_onnxruntime(src: str, dst: str) -> None:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = dst
    ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])


TOOLS = {"lkfx": run_lkfx, "onnxscript rewriter": run_onnxscript, "onnxruntime basic": run_onnxruntime,
         "onnxoptimizer": run_onnxoptimizer}


def measure(fn, src: str, dst: str, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn(src, dst)
        times.append(time.perf_counter() - start)
    left = sum(n.op_type == "BatchNormalization" for n in onnx.load(dst).graph.node)
    if left:
        raise RuntimeError(f"{fn.__name__} left {left} BatchNormalization nodes")
    return statistics.median(times)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for tool, points in results.items():
        ns = sorted(int(n) for n in points)
        ax.plot(ns, [points[str(n)] for n in ns], marker="o", label=tool)
    ax.set(xscale="log", yscale="log", xlabel="blocks N (Conv->BN->Relu)", ylabel="seconds, load to save",
           title="fold BatchNorm into Conv on ONNX")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> str:
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes = [50, 100] if args.quick else [100, 200, 300, 500, 1000, 2000, 5000]
    results: dict[str, dict[str, float]] = {t: {} for t in TOOLS}
    with tempfile.TemporaryDirectory() as d:
        for n in sizes:
            src = f"{d}/chain{n}.onnx"
            onnx.save(conv_bn_chain(n, c=8, hw=16), src)
            for tool, fn in TOOLS.items():
                if tool == "onnxoptimizer" and n > ONNXOPTIMIZER_MAX_N:
                    continue
                results[tool][str(n)] = measure(fn, src, f"{d}/out.onnx", args.repeats)
                print(f"N={n:>5}  {tool:<20} {results[tool][str(n)]:8.3f} s", flush=True)

    header = f"{'N':>6}" + "".join(f"{t:>22}" for t in TOOLS)
    print("\n" + header)
    for n in sizes:
        print(f"{n:>6}" + "".join(f"{results[t][str(n)]:>21.3f}s" if str(n) in results[t] else f"{'-':>22}"
                                  for t in TOOLS))
    out = {"machine": machine(), "sizes": sizes, "repeats": args.repeats, "seconds": results}
    big, small = str(sizes[-1]), str(sizes[-1] // 10) if str(sizes[-1] // 10) in results["lkfx"] else str(sizes[0])
    ratio = results["lkfx"][big] / results["onnxscript rewriter"][big]
    scaling = results["lkfx"][big] / results["lkfx"][small]
    out["goals"] = {f"lkfx / onnxscript at N={big}": ratio, f"lkfx time({big}) / time({small})": scaling}
    print(f"\nlkfx / onnxscript rewriter at N={big}: {ratio:.2f}x  ({'PASS' if ratio <= 0.6 else 'FAIL'}: goal <= 0.6)")
    print(f"lkfx time({big}) / time({small}): {scaling:.1f}  ({'PASS' if scaling <= 12 else 'FAIL'}: goal <= 12)")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "fold_bn_onnx.json").write_text(json.dumps(out, indent=2))
        plot(results, RESULTS / "fold_bn_onnx.png")
        print(f"wrote {RESULTS / 'fold_bn_onnx.json'} and .png")


if __name__ == "__main__":
    main()
