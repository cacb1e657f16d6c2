"""Post-training int8 on ONNX: fp32 vs lkfx `fake_quant` (each calibration method) vs onnxruntime `quantize_static`
(MinMax, Entropy, Percentile), on the same calibration data, in one run.

    python benchmarks/quant.py [--quick] [--epochs E] [--runs R] [--reps N] [--threads T] [--out DIR]

Three networks of examples/quantize_digits.py trained on scikit-learn's digits, exported to ONNX with their
BatchNorms, calibrated on 256 training images (8 batches of 32), accuracy on the 450 test images:

* digits: the small CNN (conv, BN, ReLU, depthwise, residual add) on 8x8 images, E epochs;
* mobilenet_relu6: MobileNetV1-like (stem + six depthwise 3x3 / pointwise blocks, ReLU6) on 32x32 upscaled
  images, E / 2 epochs: the case where the entropy methods used to collapse (a ReLU6 output clipped at 1.1);
* large_kernel_31x31: stride-2 stem, a RepLK-style 31x31 depthwise block with a residual add, 32x32, E / 2 epochs.

Plus ResNet-18 (torchvision definition, random weights and BN statistics) for latency only (batch 1, 224x224; 112
with --quick), and the fallback case: the digits CNN with an outlier channel injected after training (channel 0 of
the depthwise output a constant 1000, ignored by the pointwise conv), lkfx minmax with and without
``fallback=auto``.

lkfx runs with ``placement="ort"`` (onnxruntime's QDQ layout); quantize_static gets the same layout: QDQ format, uint8
activations, int8 per-channel weights, its input pre-processed by `quant_pre_process` (which folds BN) as its
documentation recommends. Calibration time: wall time of the whole call (lkfx.transform + save; quant_pre_process +
quantize_static), the fastest of N interleaved rounds (default 3). Latency: median over R interleaved rounds (each
model in turn runs 5 times back to back, the first not timed), spread over 3 fresh sets of sessions,
`intra_op_num_threads=T` (see `latencies`); 450 test images per run for the digits CNN, 64 for the 32x32 networks
(R / 3 rounds). Size: bytes of the .onnx file. One thread by default; the machine may be shared.

Goals (issues 5 and 15), per network: every lkfx method within 1 point of fp32; lkfx's best >= quantize_static's
best; each lkfx method calibrates in <= 1.5x the time of the matching quantize_static method (minmax and ema:
MinMax, percentile: Percentile, kl / symmetric_kl / js / mse: Entropy). Latency of lkfx's best no worse than
quantize_static's (5 % allowed for timing noise) on digits and ResNet-18; fallback=auto within 1 point of fp32 on the
outlier case, naming the layers kept in float. Writes DIR/quant.json and DIR/quant.png (DIR defaults to
benchmarks/results on a full run; --quick writes only with --out).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from fold_bn_onnx import machine  # benchmarks/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("minmax", "ema", "percentile", "kl", "symmetric_kl", "js", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
CALIB_BATCHES, CALIB_BATCH = 8, 32
NOISE = 1.05
BURST = 5


def digits_example():
    spec = importlib.util.spec_from_file_location("quantize_digits", ROOT / "examples" / "quantize_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export(model, x, path: Path) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "n"}})


def lkfx_int8(src: Path, dst: Path, calib: list[np.ndarray], method: str) -> None:
    import lkfx
    from lkfx.graph.onnx import save_atomic

    save_atomic(lkfx.transform(src, [("fake_quant", {"method": method, "placement": "ort"})], calib_data=calib), dst)


def ort_int8(src: Path, dst: Path, calib: list[np.ndarray], method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calib)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    pre = dst.with_suffix(".pre.onnx")
    with contextlib.redirect_stdout(io.StringIO()):  # its calibrators print progress lines
        quant_pre_process(str(src), str(pre))
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))
    pre.unlink()


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def latencies(paths: dict[str, Path], x: np.ndarray, runs: int, threads: int, sessions: int = 3) -> dict[str, float]:
    """Median milliseconds per run. `runs` rounds visit the models in turn (a load change on the machine hits them
    all alike); in its turn a model runs BURST times back to back, the first run not timed (the model is hot, as
    when it serves). The rounds are spread over `sessions` fresh sets of sessions: one session can stay slower or
    faster than its twin for its whole life (seen here for identical graphs), so no single session decides."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(sessions):
        live = {name: session(p, threads) for name, p in paths.items()}
        for _ in range(runs // sessions + (i < runs % sessions)):
            for name, s in live.items():
                s.run(None, {"x": x})
                for _ in range(BURST - 1):
                    start = time.perf_counter()
                    s.run(None, {"x": x})
                    times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def quantize_all(src: Path, folder: Path, calib: list[np.ndarray], lkfx_methods, ort_methods) -> dict[str, dict]:
    """{variant: {"path", "seconds"}} for fp32 and every quantized variant."""
    out = {"fp32": {"path": src, "seconds": 0.0}}
    jobs = [(f"lkfx {m}", lkfx_int8, m) for m in lkfx_methods] + \
           [(f"quantize_static {m}", ort_int8, m) for m in ort_methods]
    for name, fn, method in jobs:
        dst = folder / f"{src.stem}.{name.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        fn(src, dst, calib, method)
        out[name] = {"path": dst, "seconds": time.perf_counter() - start}
        print(f"  {name:<28} quantized in {out[name]['seconds']:.1f} s", flush=True)
    return out


LATENCY_IMAGES = 64  # images per latency run for the 32x32 networks (the digits CNN runs all 450 test images)
PAIRS = {"minmax": "MinMax", "ema": "MinMax", "percentile": "Percentile", "kl": "Entropy", "symmetric_kl": "Entropy",
         "js": "Entropy", "mse": "Entropy"}  # lkfx method -> the onnxruntime calibrator it is timed against


def calibration_times(src: Path, folder: Path, calib: list[np.ndarray], reps: int) -> dict[str, dict]:
    """{variant: {"path", "seconds"}}: every lkfx method and every quantize_static method, `reps` interleaved rounds
    (a load change on the shared machine hits all alike), the fastest round of each."""
    out = {"fp32": {"path": src, "seconds": 0.0}}
    jobs = [(f"lkfx {m}", lkfx_int8, m) for m in METHODS] + [(f"quantize_static {m}", ort_int8, m) for m in ORT_METHODS]
    for _ in range(reps):
        for name, fn, method in jobs:
            dst = folder / f"{src.stem}.{name.replace(' ', '_')}.onnx"
            start = time.perf_counter()
            fn(src, dst, calib, method)
            seconds = time.perf_counter() - start
            out[name] = {"path": dst, "seconds": min(seconds, out.get(name, {}).get("seconds", seconds))}
    for name, v in out.items():
        print(f"  {name:<28} quantized in {v['seconds']:.2f} s", flush=True)
    return out


def model_benchmark(name: str, model, d: tuple, epochs: int, lr: float, folder: Path, runs: int, threads: int,
                    reps: int, latency_images: int | None) -> dict[str, dict]:
    """Train `model` on digits `d`, export it, quantize it every way, measure accuracy on the test images, latency
    (onnxruntime CPU, one run over `latency_images` test images) and calibration time."""
    print(f"{name}: training the float network for {epochs} epochs ...", flush=True)
    ex = digits_example()
    ex.train(model, d, epochs, lr=lr)
    src = folder / f"{name}.onnx"
    export(model, d[0][:1], src)
    x_train, x_test, y_test = d[0].numpy(), d[2].numpy(), d[3].numpy()
    calib = [x_train[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(CALIB_BATCHES)]
    variants = calibration_times(src, folder, calib, reps)
    ms = latencies({k: v["path"] for k, v in variants.items()}, x_test[:latency_images], runs, threads)
    rows = {}
    for variant, v in variants.items():
        pred = session(v["path"], threads).run(None, {"x": x_test})[0].argmax(1)
        rows[variant] = {"accuracy": 100.0 * float((pred == y_test).mean()), "latency_ms": ms[variant],
                         "size_bytes": v["path"].stat().st_size, "quantize_seconds": v["seconds"]}
    return rows


def fallback_benchmark(folder: Path, epochs: int) -> dict:
    """The digits CNN with an outlier channel injected after training (the depthwise conv's channel 0 made a constant
    1000, which the pointwise conv ignores): the float model does not change much, a minmax range on the pointwise
    conv's input is ruined. lkfx minmax with and without ``fallback=auto``."""
    import torch

    import lkfx
    from lkfx.graph.onnx import save_atomic

    ex = digits_example()
    torch.manual_seed(1)
    d = ex.data()
    model = ex.cnn()
    ex.train(model, d, epochs)
    with torch.no_grad():
        model.dw_bn.weight[0], model.dw_bn.bias[0] = 0.0, 1000.0
        model.pw.weight[:, 0] = 0.0
    src = folder / "digits_outlier.onnx"
    export(model, d[0][:1], src)
    x_train, x_test, y_test = d[0].numpy(), d[2].numpy(), d[3].numpy()
    calib = [x_train[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(CALIB_BATCHES)]
    out = {"fp32": {"path": src}}
    for name, options in (("lkfx minmax", {}), ("lkfx minmax fallback=auto", {"fallback": "auto"})):
        dst = folder / f"outlier_{len(out)}.onnx"
        start = time.perf_counter()
        q, report = lkfx.transform(src, [("fake_quant", {"method": "minmax", "placement": "ort", **options})],
                                   calib_data=calib, return_report=True)
        save_atomic(q, dst)
        out[name] = {"path": dst, "seconds": time.perf_counter() - start,
                     "kept_float": [s.where for s in report.passes[0].skipped if "fallback=auto" in s.reason],
                     "notes": [n for n in report.passes[0].notes if n.startswith("fallback")]}
    rows = {}
    for name, v in out.items():
        pred = session(v["path"], 1).run(None, {"x": x_test})[0].argmax(1)
        rows[name] = {"accuracy": 100.0 * float((pred == y_test).mean()),
                      **{k: v[k] for k in ("seconds", "kept_float", "notes") if k in v}}
        print(f"  outlier {name:<28} accuracy {rows[name]['accuracy']:.2f} %"
              + (f", kept in float: {v['kept_float']}" if v.get("kept_float") else ""), flush=True)
    return rows


def resnet_benchmark(folder: Path, size: int, runs: int, threads: int) -> dict[str, dict]:
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1000)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    src = folder / "resnet18.onnx"
    print(f"resnet18 at {size}x{size}: exporting and quantizing ...", flush=True)
    export(model, torch.randn(1, 3, size, size), src)
    rng = np.random.default_rng(0)
    calib = [rng.standard_normal((4, 3, size, size)).astype(np.float32) for _ in range(4)]
    variants = quantize_all(src, folder, calib, ["percentile"], ["MinMax"])
    ms = latencies({k: v["path"] for k, v in variants.items()}, calib[0][:1], runs, threads)
    return {name: {"latency_ms": ms[name], "size_bytes": v["path"].stat().st_size, "quantize_seconds": v["seconds"]}
            for name, v in variants.items()}


def goals(models: dict[str, dict], resnet: dict, fallback: dict) -> dict[str, dict]:
    out = {}
    for model, rows in models.items():
        lk = {k: v for k, v in rows.items() if k.startswith("lkfx")}
        ort = {k: v for k, v in rows.items() if k.startswith("quantize_static")}
        fp32 = rows["fp32"]["accuracy"]
        worst = min(lk, key=lambda k: lk[k]["accuracy"])
        best, best_ort = max(lk, key=lambda k: lk[k]["accuracy"]), max(ort, key=lambda k: ort[k]["accuracy"])
        ratios = {m: rows[f"lkfx {m}"]["quantize_seconds"] / rows[f"quantize_static {o}"]["quantize_seconds"]
                  for m, o in PAIRS.items()}
        slowest = max(ratios, key=ratios.get)
        out[f"{model}: every lkfx method within 1 point of fp32"] = {
            "value": f"worst {worst}: {lk[worst]['accuracy']:.2f} vs fp32 {fp32:.2f}",
            "met": lk[worst]["accuracy"] >= fp32 - 1.0}
        out[f"{model}: lkfx best >= quantize_static best"] = {
            "value": f"{best}: {lk[best]['accuracy']:.2f} vs {best_ort}: {ort[best_ort]['accuracy']:.2f}",
            "met": lk[best]["accuracy"] >= ort[best_ort]["accuracy"]}
        out[f"{model}: calibration time <= 1.5x the matching quantize_static method"] = {
            "value": f"slowest lkfx {slowest} / quantize_static {PAIRS[slowest]} = {ratios[slowest]:.2f}x; "
                     + ", ".join(f"{m} {r:.2f}x" for m, r in ratios.items()),
            "met": ratios[slowest] <= 1.5}
    digits = models["digits"]
    lk = {k: v for k, v in digits.items() if k.startswith("lkfx")}
    ort = {k: v for k, v in digits.items() if k.startswith("quantize_static")}
    best, best_ort = max(lk, key=lambda k: lk[k]["accuracy"]), max(ort, key=lambda k: ort[k]["accuracy"])
    lat = digits[best]["latency_ms"] / digits[best_ort]["latency_ms"]
    lat_resnet = resnet["lkfx percentile"]["latency_ms"] / resnet["quantize_static MinMax"]["latency_ms"]
    out["digits latency <= quantize_static"] = {"value": f"{best} / {best_ort} = {lat:.2f}x", "met": lat <= NOISE}
    out["resnet18 latency <= quantize_static"] = {
        "value": f"lkfx percentile / quantize_static MinMax = {lat_resnet:.2f}x", "met": lat_resnet <= NOISE}
    fb, plain, fp32 = (fallback[k]["accuracy"] for k in ("lkfx minmax fallback=auto", "lkfx minmax", "fp32"))
    out["fallback=auto recovers minmax on an outlier channel (within 1 point of fp32)"] = {
        "value": f"{plain:.2f} -> {fb:.2f} vs fp32 {fp32:.2f}, kept in float: "
                 f"{', '.join(fallback['lkfx minmax fallback=auto']['kept_float']) or 'none'}",
        "met": fb >= fp32 - 1.0 and bool(fallback["lkfx minmax fallback=auto"]["kept_float"])}
    return out


def plot(models: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4))
    for ax, (model, rows) in zip(axes, models.items(), strict=True):
        names = [k for k in rows if k != "fp32"]
        accs = [rows[k]["accuracy"] for k in names]
        ax.bar(range(len(names)), accs, color=["tab:blue" if k.startswith("lkfx") else "tab:orange" for k in names])
        ax.axhline(rows["fp32"]["accuracy"], color="black", linestyle="--", label="fp32")
        ax.set_xticks(range(len(names)), [k.replace("quantize_static", "ORT") for k in names], rotation=45,
                      ha="right", fontsize=7)
        ax.set(ylabel="test accuracy (%)", ylim=(max(0.0, min(accs) - 3), 100.5), title=model)
        ax.legend(loc="lower right")
    fig.suptitle("int8 PTQ on ONNX: lkfx fake_quant (blue) vs onnxruntime quantize_static (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs, runs and a smaller ResNet input")
    parser.add_argument("--epochs", type=int, help="training epochs of the digits CNN (default 20, 6 with --quick); "
                                                   "the 32x32 networks train half as many")
    parser.add_argument("--runs", type=int, help="latency rounds (default 60, 12 with --quick)")
    parser.add_argument("--reps", type=int, help="calibration-time rounds, fastest kept (default 3, 1 with --quick)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for quant.json and quant.png (default: results/ on a full run; --quick writes "
                             "only where --out says)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # quantize_static's "please pre-process" warnings: we do
    epochs = args.epochs or (6 if args.quick else 20)
    runs = args.runs or (12 if args.quick else 60)
    reps = args.reps or (1 if args.quick else 3)
    size = 112 if args.quick else 224
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    ex = digits_example()
    d8, d32 = ex.data(), ex.data(32)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        models = {}
        for name, make, data, n, lr, images in (
                ("digits", ex.cnn, d8, epochs, 3e-3, None),
                ("mobilenet_relu6", ex.MobileNetV1, d32, max(1, epochs // 2), 3e-3, LATENCY_IMAGES),
                ("large_kernel_31x31", ex.LargeKernelNet, d32, max(1, epochs // 2), 1e-2, LATENCY_IMAGES)):
            torch.manual_seed(0)
            models[name] = model_benchmark(name, make(), data, n, lr, folder, runs if images is None else
                                           max(3, runs // 3), args.threads, reps, images)
        fallback = fallback_benchmark(folder, epochs)
        resnet = resnet_benchmark(folder, size, runs, args.threads)

    for model, rows in models.items():
        images = "450" if model == "digits" else str(LATENCY_IMAGES)
        print(f"\n{model} (latency: {images} images per run, {args.threads} thread(s); calibration: fastest of "
              f"{reps})")
        print(f"{'model':<28}{'accuracy %':>11}{'latency ms':>12}{'size bytes':>12}{'calib s':>9}")
        for name, r in rows.items():
            print(f"{name:<28}{r['accuracy']:>11.2f}{r['latency_ms']:>12.2f}{r['size_bytes']:>12,}"
                  f"{r['quantize_seconds']:>9.2f}")
    print(f"\nresnet18 ({size}x{size}, batch 1)")
    for name, r in resnet.items():
        print(f"{name:<28}{'':>11}{r['latency_ms']:>12.2f}{r['size_bytes']:>12,}")
    met = goals(models, resnet, fallback)
    print()
    for goal, g in met.items():
        print(f"{'PASS' if g['met'] else 'FAIL'}  {goal}: {g['value']}")
    out = {"machine": machine(), "shared_machine": "other jobs ran on the same machine; every column of a table was "
           "measured interleaved in the same run", "quick": args.quick, "epochs": epochs, "runs": runs,
           "calibration_rounds": reps, "threads": args.threads, "resnet_size": size,
           "calibration": f"{CALIB_BATCHES} batches of {CALIB_BATCH} training images",
           "calibration_time": "wall time of the whole quantization call: lkfx.transform + save; quant_pre_process + "
                               "quantize_static (its recommended flow)",
           "digits": models["digits"], "mobilenet_relu6": models["mobilenet_relu6"],
           "large_kernel_31x31": models["large_kernel_31x31"], "fallback": fallback, "resnet18": resnet,
           "goals": met}
    out_dir = args.out or (None if args.quick else RESULTS)
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant.json").write_text(json.dumps(out, indent=2))
    plot(models, out_dir / "quant.png")
    print(f"wrote {out_dir / 'quant.json'} and quant.png")


if __name__ == "__main__":
    main()
