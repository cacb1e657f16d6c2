"""Large-kernel reparameterisation: train form vs deploy form of a RepLKNet-31B-shaped network, one run, CPU.

    python benchmarks/reparam.py [--quick] [--repeats R] [--batches 1 8]

The network follows RepLKNet-31B: channels 128/256/512/1024, blocks 2/2/18/2, large kernels 31/29/27/13 each with
a parallel 5x5 (lkfx's ReparamLargeKernelConv), RepLKNet's stem, transitions, RepLK blocks (BN, 1x1, large
depthwise, 1x1, residual) and ConvFFN blocks (BN, 1x1 x4, GELU, 1x1, residual), input 224x224, random weights
and BN statistics. `--quick` shrinks it (channels 16/32/64/128, blocks 1/1/2/1, 64x64) as a smoke test.

Measured in this one process, median of R runs after a warm-up:
* PyTorch: train form (all branches, eval mode) vs deploy form (``["merge_reparam", "fold_bn"]``): latency at each
  batch size and parameter count;
* ONNX: the train form exported with BatchNormalization kept, then ``merge_reparam`` and then
  ``fold_bn + merge_reparam``: file size and onnxruntime latency (default graph optimisations, which already fuse
  Conv + BN but not parallel branches).
The full run writes benchmarks/results/reparam.json; --quick writes nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

import lkfx
from lkfx.compare import max_rel_error
from lkfx.graph.onnx import save_atomic
from lkfx.modules.replk import ReparamLargeKernelConv

RESULTS = Path(__file__).parent / "results"
FULL = {"channels": (128, 256, 512, 1024), "blocks": (2, 2, 18, 2), "kernels": (31, 29, 27, 13), "size": 224}
QUICK = {"channels": (16, 32, 64, 128), "blocks": (1, 1, 2, 1), "kernels": (31, 29, 27, 13), "size": 64}


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, nn.ReLU()) if act else nn.Sequential(*layers)


def replk_large(c: int, k: int) -> nn.Module:
    """The train form's large conv: k x k depthwise + BN in parallel with 5 x 5 depthwise + BN."""
    return ReparamLargeKernelConv(c, k, small_kernels=(5,))


class RepLKBlock(nn.Module):
    def __init__(self, c: int, k: int, large: Callable[[int, int], nn.Module] = replk_large):
        super().__init__()
        self.pre_bn, self.pw1 = nn.BatchNorm2d(c), conv_bn(c, c, 1)
        self.large, self.act = large(c, k), nn.ReLU()
        self.pw2 = conv_bn(c, c, 1, act=False)

    def forward(self, x):
        return x + self.pw2(self.act(self.large(self.pw1(self.pre_bn(x)))))


class ConvFFN(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.pre_bn = nn.BatchNorm2d(c)
        self.pw1, self.act, self.pw2 = conv_bn(c, 4 * c, 1, act=False), nn.GELU(), conv_bn(4 * c, c, 1, act=False)

    def forward(self, x):
        return x + self.pw2(self.act(self.pw1(self.pre_bn(x))))


def replknet(channels, blocks, kernels, num_classes: int = 1000,
             large: Callable[[int, int], nn.Module] = replk_large) -> nn.Module:
    """RepLKNet's layout (stem, transitions, RepLK + ConvFFN blocks) with `large(c, k)` as each block's large conv,
    random non-trivial BatchNorm statistics, eval mode."""
    c0 = channels[0]
    layers = [conv_bn(3, c0, 3, 2), conv_bn(c0, c0, 3, groups=c0), conv_bn(c0, c0, 1), conv_bn(c0, c0, 3, 2, c0)]
    for i, (c, n, k) in enumerate(zip(channels, blocks, kernels, strict=True)):
        if i:
            layers += [conv_bn(channels[i - 1], c, 1), conv_bn(c, c, 3, 2, c)]
        for _ in range(n):
            layers += [RepLKBlock(c, k, large), ConvFFN(c)]
    c = channels[-1]
    layers += [nn.BatchNorm2d(c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return randomize(nn.Sequential(*layers))


def randomize(model: nn.Module) -> nn.Module:
    """Random, non-trivial BatchNorm statistics and affine parameters (seed 0), so no fold is the identity."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        return median_ms(lambda: model(x), repeats)


def ort_ms(path: Path, x: np.ndarray, repeats: int) -> float:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return median_ms(lambda: sess.run(None, {name: x}), repeats)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small network, as a smoke test")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10, quick 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 1 8, quick 1 2)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 10)
    batches = args.batches or ([1, 2] if args.quick else [1, 8])
    torch.manual_seed(0)
    train = replknet(cfg["channels"], cfg["blocks"], cfg["kernels"])
    size = cfg["size"]
    probe = torch.randn(1, 3, size, size)
    deploy, report = lkfx.transform(train, ["merge_reparam", "fold_bn"], example_inputs=(probe,), check=True,
                                    return_report=True)
    out = {"machine": f"{platform.processor() or platform.machine()}, {platform.system()}, python "
                      f"{platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                      f"onnxruntime {ort.__version__}",
           "network": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}, "repeats": repeats,
           "merged_blocks": report["merge_reparam"].rewritten, "folded_bn": report["fold_bn"].rewritten,
           "deploy_vs_train_max_rel_error": report.check["max_rel_error"],
           "parameters": {"train": params(train), "deploy": params(deploy)}, "torch_ms": {}, "onnx": {}}
    print(f"RepLKNet-{'quick' if args.quick else '31B'}-shaped, {size}x{size}: {out['merged_blocks']} blocks merged, "
          f"{out['folded_bn']} BNs folded, deploy vs train max relative error {report.check['max_rel_error']:.1e}")
    print(f"parameters: train form {params(train):,}, deploy form {params(deploy):,}")
    for b in batches:
        x = torch.randn(b, 3, size, size)
        t, d = torch_ms(train, x, repeats), torch_ms(deploy, x, repeats)
        out["torch_ms"][str(b)] = {"train": t, "deploy": d}
        print(f"PyTorch batch {b}: train form {t:9.1f} ms, deploy form {d:9.1f} ms  ({t / d:.2f}x)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        files = {"train form": Path(tmp) / "train.onnx", "merge_reparam": Path(tmp) / "merged.onnx",
                 "fold_bn + merge_reparam": Path(tmp) / "deploy.onnx"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(train, (probe,), str(files["train form"]), dynamo=False, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE, input_names=["image"],
                              dynamic_axes={"image": {0: "batch"}})
        save_atomic(lkfx.transform(files["train form"], ["merge_reparam"], check=True), files["merge_reparam"])
        save_atomic(lkfx.transform(files["train form"], ["fold_bn", "merge_reparam"], check=True),
                    files["fold_bn + merge_reparam"])
        for label, path in files.items():
            row = {"bytes": path.stat().st_size, "ort_ms": {}}
            for b in batches:
                x = np.random.default_rng(b).standard_normal((b, 3, size, size), dtype=np.float32)
                row["ort_ms"][str(b)] = ort_ms(path, x, repeats)
            out["onnx"][label] = row
            times = ", ".join(f"batch {b} {row['ort_ms'][str(b)]:9.1f} ms" for b in batches)
            print(f"ONNX {label:<24} {row['bytes'] / 2**20:8.1f} MiB, onnxruntime {times}", flush=True)
        sess = [ort.InferenceSession(str(files[k]), providers=["CPUExecutionProvider"])
                for k in ("train form", "fold_bn + merge_reparam")]
        feed = {"image": probe.numpy()}
        err = max_rel_error(sess[0].run(None, feed), sess[1].run(None, feed))
        out["onnx_deploy_vs_train_max_rel_error"] = err
        print(f"onnxruntime deploy vs train form: max relative error {err:.1e}")
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "reparam.json").write_text(json.dumps(out, indent=2))
        print(f"wrote {RESULTS / 'reparam.json'}")


if __name__ == "__main__":
    main()
