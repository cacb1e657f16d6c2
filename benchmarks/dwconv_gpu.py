"""lower_dwconv on a CUDA GPU: lkfx's Triton depthwise conv vs PyTorch ``nn.Conv2d(groups=C)`` (cuDNN), one run.

    python benchmarks/dwconv_gpu.py [--quick] [--repeats R] [--peak-tflops P] [--out DIR]

Grid (the RepLKNet paper's): batch 64, 384 channels, maps R in {16, 32, 64}, kernels K in {3, 5, 7, 9, 13, 17,
21, 27, 29, 31}, 'same' padding, stride 1; fp32 and fp16; forward, and forward + backward (grads of input,
weight and bias). Per shape, each method is warmed up (Triton autotunes, cuDNN benchmarks its algorithms with
``torch.backends.cudnn.benchmark``), then timed with CUDA events around each call; the methods take turns and
the median of R repeats is reported. The outputs of both are compared (max |diff| / max |cuDNN|), and the
forward configuration Triton's autotuner chose (direct or Toeplitz form, block sizes) is recorded.

Achieved FLOP/s counts 2 FLOPs per tap that touches the image (taps reading padding are not work; on a 16x16
map a 31x31 kernel reads mostly padding) and is reported as a fraction of the GPU's fp32 peak: SMs x fp32 lanes
per SM (by compute capability) x 2 x the maximum SM clock from ``nvidia-smi``, or ``--peak-tflops``.

Goals (issue 7), printed as PASS / FAIL: at K=31 in fp32 (forward) lkfx at least 10x faster than cuDNN on every
map; lkfx's K=31 at most 3x its own K=9. The full run writes benchmarks/results/dwconv_gpu.json and
dwconv_gpu.png (latency vs K, both methods); --quick (R=16, K in {3, 9, 31}, fp32) writes only with --out.
Without a CUDA GPU the script exits with status 2 and says so: there are no CPU numbers to make up.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn as nn

RESULTS = Path(__file__).parent / "results"
BATCH, CHANNELS = 64, 384
MAPS = (16, 32, 64)
KERNELS = (3, 5, 7, 9, 13, 17, 21, 27, 29, 31)
FP32_LANES_PER_SM = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
                     (10, 0): 128, (12, 0): 128}


def useful_flops(batch: int, channels: int, size: int, k: int) -> int:
    """2 x the taps that read the image (not the padding) of a 'same' stride-1 depthwise conv."""
    pad = k // 2
    per_axis = sum(sum(1 for j in range(k) if 0 <= o - pad + j < size) for o in range(size))
    return 2 * batch * channels * per_axis * per_axis


def fp32_peak_flops(override_tflops: float | None) -> tuple[float | None, str]:
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    props = torch.cuda.get_device_properties(0)
    lanes = FP32_LANES_PER_SM.get((props.major, props.minor))
    smi = shutil.which("nvidia-smi")
    if lanes is None or smi is None:
        return None, "unknown (give --peak-tflops)"
    out = subprocess.run([smi, "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=False).stdout.strip()
    try:
        mhz = float(out.splitlines()[0])
    except (ValueError, IndexError):
        return None, "unknown (nvidia-smi gave no clock; give --peak-tflops)"
    return props.multi_processor_count * lanes * 2 * mhz * 1e6, \
        f"{props.multi_processor_count} SMs x {lanes} lanes x 2 x {mhz:.0f} MHz"


def timed(fn, repeats_by_name: dict, name: str) -> None:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    repeats_by_name[name].append(start.elapsed_time(end) / 1e3)


def measure(size: int, k: int, dtype: torch.dtype, backward: bool, repeats: int) -> dict:
    import lkfx.backends.dwconv_op  # noqa: F401  (registers torch.ops.lkfx.dwconv2d)

    gen = torch.Generator(device="cuda").manual_seed(0)
    conv = nn.Conv2d(CHANNELS, CHANNELS, k, padding=k // 2, groups=CHANNELS).to("cuda", dtype)
    x = torch.randn(BATCH, CHANNELS, size, size, device="cuda", dtype=dtype, generator=gen,
                    requires_grad=backward)
    grad = torch.randn(BATCH, CHANNELS, size, size, device="cuda", dtype=dtype, generator=gen)
    pads = [k // 2] * 4

    def lkfx_call():
        return torch.ops.lkfx.dwconv2d(x, conv.weight, conv.bias, [1, 1], pads)

    calls = {"lkfx": lkfx_call, "cudnn": lambda: conv(x)}
    if backward:
        def with_backward(f):
            def run():
                f().backward(grad)
            return run
        fns = {name: with_backward(f) for name, f in calls.items()}
    else:
        fns = calls
    with torch.set_grad_enabled(backward):
        ref, out = calls["cudnn"]().float(), calls["lkfx"]().float()
        err = float((out - ref).abs().max() / ref.abs().max())
        for fn in fns.values():  # warm-up: autotuning, cuDNN algorithm search
            fn()
            fn()
        torch.cuda.synchronize()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(repeats):
            for name, fn in fns.items():
                timed(fn, times, name)
    from lkfx.backends import dwconv_triton

    return {"lkfx_s": statistics.median(times["lkfx"]), "cudnn_s": statistics.median(times["cudnn"]),
            "max_rel_error": err, "lkfx_forward_config": str(dwconv_triton._forward_kernel.best_config)}


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["mode"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (dtype, mode) in zip(axes[0], panels, strict=True):
        for size in sorted({r["map"] for r in rows}):
            sel = sorted((r for r in rows if (r["dtype"], r["mode"], r["map"]) == (dtype, mode, size)),
                         key=lambda r: r["k"])
            ks = [r["k"] for r in sel]
            line = ax.plot(ks, [r["lkfx_s"] * 1e3 for r in sel], "o-", label=f"lkfx {size}x{size}")[0]
            ax.plot(ks, [r["cudnn_s"] * 1e3 for r in sel], "s--", color=line.get_color(),
                    label=f"cuDNN {size}x{size}")
        ax.set_yscale("log")
        ax.set_xlabel("kernel size K")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"{dtype} {mode}")
        ax.legend(fontsize=7)
    fig.suptitle(f"depthwise conv, batch {BATCH}, {CHANNELS} channels, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="R=16, K in {3, 9, 31}, fp32 (smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method and shape (default 10)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's fp32 peak, if not derivable")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON and PNG (full run: results/)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("dwconv_gpu: no CUDA GPU here; this benchmark times GPU kernels and has nothing to measure on a CPU "
              "(run it on a machine with an NVIDIA GPU)", file=sys.stderr)
        sys.exit(2)
    torch.backends.cudnn.benchmark = True
    maps, kernels = ((16,), (3, 9, 31)) if args.quick else (MAPS, KERNELS)
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.float16)
    repeats = args.repeats or (3 if args.quick else 10)
    device = torch.cuda.get_device_name(0)
    peak, peak_how = fp32_peak_flops(args.peak_tflops)
    print(f"{device}; fp32 peak {peak / 1e12 if peak else float('nan'):.1f} TFLOP/s ({peak_how}); torch "
          f"{torch.__version__}; batch {BATCH}, {CHANNELS} channels; median of {repeats}")
    print(f"{'dtype':8} {'mode':9} {'map':>4} {'K':>3} {'lkfx ms':>9} {'cuDNN ms':>9} {'speed-up':>8} "
          f"{'lkfx TFLOP/s':>12} {'of peak':>7} {'rel err':>8}")
    rows = []
    for dtype in dtypes:
        for mode in ("forward", "fwd+bwd"):
            for size in maps:
                for k in kernels:
                    r = measure(size, k, dtype, mode == "fwd+bwd", repeats)
                    flops = useful_flops(BATCH, CHANNELS, size, k) * (3 if mode == "fwd+bwd" else 1)
                    r.update(dtype=str(dtype).removeprefix("torch."), mode=mode, map=size, k=k, useful_flops=flops,
                             lkfx_flops_per_s=flops / r["lkfx_s"],
                             fraction_of_fp32_peak=flops / r["lkfx_s"] / peak if peak else None)
                    rows.append(r)
                    frac = f"{r['fraction_of_fp32_peak']:.1%}" if peak else "n/a"
                    print(f"{r['dtype']:8} {mode:9} {size:>4} {k:>3} {r['lkfx_s'] * 1e3:>9.3f} "
                          f"{r['cudnn_s'] * 1e3:>9.3f} {r['cudnn_s'] / r['lkfx_s']:>7.1f}x "
                          f"{r['lkfx_flops_per_s'] / 1e12:>12.2f} {frac:>7} {r['max_rel_error']:>8.1e}", flush=True)
    goals = []
    for size in maps:
        def at(k, size=size):
            return next((r for r in rows if (r["dtype"], r["mode"], r["map"], r["k"]) ==
                         ("float32", "forward", size, k)), None)
        k31, k9 = at(31), at(9)
        if k31:
            speedup = k31["cudnn_s"] / k31["lkfx_s"]
            goals.append((f"{size}x{size} fp32 K=31: lkfx {speedup:.1f}x faster than cuDNN (goal >= 10x)",
                          speedup >= 10))
        if k31 and k9:
            ratio = k31["lkfx_s"] / k9["lkfx_s"]
            goals.append((f"{size}x{size} fp32 K=31 / K=9 time in lkfx: {ratio:.2f} (goal <= 3)", ratio <= 3))
    for text, ok in goals:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    out = args.out if args.out is not None else (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        meta = {"device": device, "torch": torch.__version__, "fp32_peak_flops": peak, "peak_from": peak_how,
                "batch": BATCH, "channels": CHANNELS, "repeats": repeats, "quick": args.quick}
        (out / "dwconv_gpu.json").write_text(json.dumps(
            {"meta": meta, "rows": rows, "goals": [{"goal": t, "passed": ok} for t, ok in goals]}, indent=1))
        plot(rows, out / "dwconv_gpu.png", device)
        print(f"wrote {out / 'dwconv_gpu.json'} and {out / 'dwconv_gpu.png'}")


if __name__ == "__main__":
    main()
