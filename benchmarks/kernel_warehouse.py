"""kernel_warehouse: parameters and CPU forward latency of KernelWarehouse models vs their static originals.

    python benchmarks/kernel_warehouse.py [--quick] [--repeats R] [--out FILE.json]

torchvision ResNet18, ResNet50 and MobileNetV2 (random weights, 1000 classes) are converted with the pass at
budgets 1/4, 1/2, 1, 2 and 4 (default stage sharing; ResNet50 below 1x with ``nonlocal_basis=1/16`` as the
official config). For each: parameters, the paper's count where it reports one, and the median eval-mode
forward latency at batch 8, 224 x 224, of the static model and the KW model, measured in the same run.
Writes benchmarks/results/kernel_warehouse.json (``--quick``: 64 x 64 inputs, budgets 1/2 and 1, one timed
run, nothing written unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torchvision

import lkfx

RESULTS = Path(__file__).parent / "results"
MODELS = ("resnet18", "resnet50", "mobilenet_v2")
BUDGETS = (0.25, 0.5, 1.0, 2.0, 4.0)
# parameters (millions) of the paper's models (KernelWarehouse, Li & Yao 2023, tables 1-3)
PAPER = {"resnet18": {None: 11.69, 0.5: 7.43, 0.25: 4.08, 1.0: 11.93, 2.0: 23.24, 4.0: 45.86},
         "resnet50": {None: 25.56, 0.5: 17.64, 1.0: 28.05, 4.0: 102.02},
         "mobilenet_v2": {None: 3.50, 0.5: 2.65, 1.0: 5.17, 4.0: 11.38}}


def latency(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward pass (after one warm-up)."""
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def options(name: str, budget: float) -> dict:
    return {"budget": budget, **({"nonlocal_basis": 1 / 16} if name == "resnet50" and budget < 1 else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs, two budgets (smoke test)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, help="JSON file (default: results/kernel_warehouse.json)")
    args = parser.parse_args()
    size, budgets, repeats = (64, (0.5, 1.0), 1) if args.quick else (224, BUDGETS, args.repeats)
    torch.manual_seed(0)
    x = torch.randn(8, 3, size, size)
    rows = []
    for name in MODELS:
        static = getattr(torchvision.models, name)().eval()
        t_static = latency(static, x, repeats)
        paper = PAPER[name]
        rows.append({"model": name, "budget": None, "params": params(static), "paper_params_m": paper[None],
                     "latency_s": t_static, "static_latency_s": t_static})
        for b in budgets:
            kw = lkfx.transform(static, [("kernel_warehouse", options(name, b))], example_inputs=x[:2]).eval()
            lkfx.set_temperature(kw, 0.0)  # the trained state; tau does not change the cost
            rows.append({"model": name, "budget": b, "params": params(kw), "paper_params_m": paper.get(b),
                         "latency_s": latency(kw, x, repeats),
                         "static_latency_s": latency(static, x, repeats)})
            del kw
    print(f"batch 8, {size}x{size}, {torch.get_num_threads()} threads, median of {repeats}")
    print(f"{'model':<13} {'budget':>6} {'params (M)':>10} {'paper (M)':>9} {'ms':>8} {'static ms':>9} "
          f"{'x':>5}")
    for r in rows:
        budget = "static" if r["budget"] is None else f"{r['budget']:g}"
        paper = "" if r["paper_params_m"] is None else f"{r['paper_params_m']:.2f}"
        print(f"{r['model']:<13} {budget:>6} {r['params'] / 1e6:>10.2f} {paper:>9} "
              f"{r['latency_s'] * 1e3:>8.1f} {r['static_latency_s'] * 1e3:>9.1f} "
              f"{r['latency_s'] / r['static_latency_s']:>5.2f}")
    out = args.out if args.out is not None else (None if args.quick else RESULTS / "kernel_warehouse.json")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"batch": 8, "size": size, "repeats": repeats, "threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
