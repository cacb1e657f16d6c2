"""Int8 quantization of a small CNN on scikit-learn's 8x8 digits: post-training calibration with each method, and
quantization-aware training.

    python examples/quantize_digits.py [--epochs 20] [--qat-epochs 3] [--seed 0]

1. trains the float CNN (conv, BN, ReLU, a depthwise-separable residual block with an add, a strided conv, linear);
2. PTQ: `lkfx.transform(cnn.eval(), [("fake_quant", {"method": m})])` then `lkfx.calibrate(q, batches)` for
   each method, and measures test accuracy;
3. QAT: `("fake_quant", {"qat": True})` on the float CNN in training mode (conv + BN become fused fake-quant
   modules), calibrated, then a few epochs of fine-tuning with BN statistics frozen half-way (`freeze_bn`);
4. prints an accuracy table.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import lkfx
from lkfx.quant import freeze_bn
from lkfx.quant.observers import METHODS


def data(size: int = 8) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): 1347 / 450 digits as (N, 1, size, size) floats in [0, 1] (bilinear
    upscaling from 8x8 when size > 8)."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


class DigitsCNN(nn.Module):
    """stem conv-BN-ReLU, residual block (depthwise 3x3 - BN - ReLU - pointwise - BN, + input), strided conv, linear."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.dw_bn = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.pw_bn(self.pw(F.relu(self.dw_bn(self.dw(x)))))
        x = F.relu(x + y)
        x = self.down(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def cnn() -> DigitsCNN:
    return DigitsCNN()


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type = nn.ReLU6) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act())


class MobileNetV1(nn.Sequential):
    """MobileNetV1-like, for 32x32 inputs: stem 3x3 conv, six depthwise 3x3 + pointwise 1x1 blocks, ReLU6 after
    every BN, global average pool, linear. ReLU6 piles values up at 6.0, the case the entropy calibrators must not
    clip."""

    def __init__(self, width: int = 16):
        w = width
        blocks = [(w, 2 * w, 1), (2 * w, 4 * w, 2), (4 * w, 4 * w, 1), (4 * w, 8 * w, 2), (8 * w, 8 * w, 1),
                  (8 * w, 8 * w, 2)]
        layers = [_conv_bn(1, w, 3)]
        for cin, cout, stride in blocks:
            layers += [_conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, cout, 1)]
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))


class LargeKernelNet(nn.Module):
    """For 32x32 inputs: stride-2 stem, `blocks` RepLK-style blocks (depthwise 31x31 - BN - ReLU - pointwise - BN,
    + input), a strided conv, linear. The 31x31 kernels see the whole 16x16 map."""

    def __init__(self, width: int = 16, kernel: int = 31, blocks: int = 1):
        super().__init__()
        self.stem = _conv_bn(1, width, 3, 2, act=nn.ReLU)
        self.blocks = nn.ModuleList(nn.Sequential(_conv_bn(width, width, kernel, groups=width, act=nn.ReLU),
                                                  nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
                                    for _ in range(blocks))
        self.down = _conv_bn(width, 2 * width, 3, 2, act=nn.ReLU)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = F.relu(x + block(x))
        x = self.down(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def train(model: nn.Module, data: tuple, epochs: int, seed: int = 0, lr: float = 3e-3, on_step=None) -> float:
    """Adam + cosine learning rate, batch 64, fixed data order. `on_step(step)` runs before each step.
    Returns test accuracy in %."""
    x, y, x_test, y_test = data
    steps = (len(y) + 63) // 64
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(epochs * steps, 1))
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y), generator=gen).split(64):
            if on_step is not None:
                on_step(step)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
            step += 1
    return accuracy(model, x_test, y_test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    d = data()
    calib = list(d[0].split(128))  # the training images, as calibration batches
    model = cnn()
    rows = [("fp32", "-", train(model, d, args.epochs, args.seed))]
    model.eval()
    for method in METHODS:
        q = lkfx.transform(model, [("fake_quant", {"method": method})])
        lkfx.calibrate(q, calib)
        rows.append(("PTQ int8", method, accuracy(q, d[2], d[3])))
    model.train()
    q = lkfx.transform(model, [("fake_quant", {"qat": True})])
    lkfx.calibrate(q, calib)  # start from calibrated ranges; training then tracks them by moving average
    freeze_at = args.qat_epochs * ((len(d[1]) + 63) // 64) // 2
    acc = train(q, d, args.qat_epochs, args.seed, lr=3e-4, on_step=lambda step: step == freeze_at and freeze_bn(q))
    rows.append((f"QAT int8 ({args.qat_epochs} epochs)", "ema", acc))
    print(f"{'model':<22} {'method':<13} {'accuracy':>8}")
    for name, method, acc in rows:
        print(f"{name:<22} {method:<13} {acc:>8.2f}")
    best = max(acc for _, _, acc in rows[1:])
    print(f"best int8 vs fp32: {best - rows[0][2]:+.2f} points")


if __name__ == "__main__":
    main()
