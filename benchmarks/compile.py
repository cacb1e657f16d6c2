"""torch.compile backends side by side: eager vs ``backend="inductor"`` vs ``backend="lkfx"``, inference, one run.

    python benchmarks/compile.py [--quick] [--device cpu|cuda] [--repeats R] [--batches 1 8] [--out FILE]

Networks (random weights and BN statistics, eval mode, ``torch.no_grad()``):
* RepLKNet-31B-shaped, deploy form (each large depthwise kernel one conv + BN): channels 128/256/512/1024, blocks
  2/2/18/2, kernels 31/29/27/13, RepLKNet's stem, transitions, RepLK blocks and ConvFFN blocks, 224x224;
* ResNet-50 (torchvision's definition), 224x224.
`--quick` shrinks both (RepLKNet channels 16/32/64/128, blocks 1/1/2/1; both at 64x64) as a smoke test.

Each backend is compiled with ``dynamic=False`` for each batch size (Dynamo reset before each) and timed as the
fastest of R calls after the compiling call and one warm-up (the fastest, not the median: on a loaded machine
other processes only ever add time); the first call (compile included) is reported too.
``inductor + freezing`` is inductor with ``options={"freezing": True}``: lkfx compiles its inference graphs with
freezing on (its parameters are constants once BN is folded), so that column separates what freezing gives from what
lkfx's passes give. ``lkfx`` runs its default passes (CPU: ``fold_bn``; CUDA: also ``lower_dwconv`` and ``fft_conv``
in ``auto`` mode); ``lkfx + fft_conv`` (RepLKNet only: ResNet-50 has no conv it selects) adds ``fft_conv`` on every
stride-1 conv of kernel >= 5. Goals printed at the end: lkfx (the better of its two columns) at least 2x faster than
inductor on the RepLKNet-shaped network, and never more than 5% slower than inductor on ResNet-50. The full run
writes benchmarks/results/compile.json; --quick writes only where --out says.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from reparam import FULL, QUICK, conv_bn, randomize, replknet  # benchmarks/ is on sys.path
from tqdm import tqdm

from lkfx.backends.dynamo import last_report
from lkfx.compare import max_rel_error

RESULTS = Path(__file__).parent / "results"
BACKENDS = {"eager": None, "inductor": ("inductor", {}), "inductor + freezing": ("inductor", {"freezing": True}),
            "lkfx": ("lkfx", {}),
            "lkfx + fft_conv": ("lkfx", {"passes": ["fold_bn", ("fft_conv", {"min_kernel": 5, "mode": "always"})]})}


def plain_large(c: int, k: int) -> nn.Module:
    """The deployed block's large conv: one k x k depthwise conv + BN (what `merge_reparam` leaves, BN unfolded)."""
    return conv_bn(c, c, k, groups=c, act=False)


def timed(fn, repeats: int, sync) -> tuple[float, float, torch.Tensor]:
    """(seconds of the first call, fastest of `repeats` calls after one warm-up, the output)."""
    start = time.perf_counter()
    out = fn()
    sync()
    first = time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return first, min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small networks at 64x64, as a smoke test")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 10, quick 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", type=Path, default=None, help="results JSON (default: results/compile.json on a full run)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    out_path = args.out or (None if args.quick else RESULTS / "compile.json")
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    size = cfg["size"]
    torch.manual_seed(0)
    networks = {
        "RepLKNet-31B-shaped" if not args.quick else "RepLKNet-quick-shaped":
            replknet(cfg["channels"], cfg["blocks"], cfg["kernels"], large=plain_large).to(dev),
        "ResNet-50": randomize(torchvision.models.resnet50()).to(dev),
    }
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    result = {"machine": f"{device_name}, {platform.system()}, python {platform.python_version()}, torch "
                         f"{torch.__version__} ({torch.get_num_threads()} threads)",
              "device": dev.type, "quick": args.quick, "size": size, "repeats": repeats, "rows": [], "lkfx": {}}
    print(result["machine"])
    steps = tqdm(total=(2 * len(BACKENDS) - 1) * len(args.batches), desc="compile + time", leave=False)
    for net_name, model in networks.items():
        compiled = {name: model if spec is None else
                    torch.compile(model, backend=spec[0], options=spec[1] or None, dynamic=False)
                    for name, spec in BACKENDS.items() if "fft" not in name or net_name.startswith("RepLK")}
        for b in args.batches:
            x = torch.randn(b, 3, size, size, device=dev)
            row = {"network": net_name, "batch": b}
            ref = None
            for name, fn in compiled.items():
                torch._dynamo.reset()  # each backend compiles this batch size afresh; the first call is timed
                with torch.no_grad():
                    first, fastest, y = timed(lambda fn=fn, x=x: fn(x), repeats, sync)
                steps.update()
                row[f"{name} ms"] = fastest * 1e3
                if name != "eager":
                    row[f"{name} first call s"] = first
                if ref is None:
                    ref = y.float().cpu().numpy()
                elif name.startswith("lkfx"):
                    row[f"{name} max rel error"] = max_rel_error([ref], [y.float().cpu().numpy()])
                    result["lkfx"][f"{net_name}, batch {b}, {name}"] = last_report().to_dict()
            row["lkfx / inductor speedup"] = row["inductor ms"] / min(row[f"{n} ms"] for n in compiled if "lkfx" in n)
            result["rows"].append(row)
            tqdm.write(f"{net_name:>22} batch {b}: " + ", ".join(
                f"{n} {row[f'{n} ms']:.1f} ms" for n in compiled) +
                f"  (lkfx {row['lkfx / inductor speedup']:.2f}x inductor, error {row['lkfx max rel error']:.1e})")
    steps.close()
    large = [r["lkfx / inductor speedup"] for r in result["rows"] if r["network"].startswith("RepLKNet")]
    resnet = [r["lkfx / inductor speedup"] for r in result["rows"] if r["network"] == "ResNet-50"]
    result["goals"] = {
        "lkfx >= 2x inductor on the RepLKNet-shaped network": min(large) >= 2.0,
        "lkfx never > 5% slower than inductor on ResNet-50": min(resnet) >= 1 / 1.05,
    }
    for goal, met in result["goals"].items():
        print(f"goal {'MET' if met else 'NOT MET'}: {goal} (speedups "
              f"{', '.join(f'{s:.2f}x' for s in (large if 'RepLK' in goal else resnet))})")
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2))
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
