"""Regenerate the demo's model and data (examples/data/): a small RepVGG / RepLKNet-style CNN trained on
scikit-learn's digits, exported to ONNX in its train form (every branch and every BatchNorm kept).

    .venv/bin/python scripts/make_demo_model.py      # needs the [dev] install (torch, scikit-learn)

Blocks, as a training checkpoint has them before deploy conversion:
- RepVGG block: 3x3 conv + BN, 1x1 conv + BN and (same shape) a BN on the identity, summed, then ReLU;
- large-kernel block (RepLKNet): a 7x7 depthwise conv + BN next to a 3x3 depthwise conv + BN, summed, ReLU,
  a 1x1 conv + BN, and a residual add around it all.
Exported with the TorchScript exporter without constant folding, the command README.md gives for keeping BNs.
Training is seeded; the printed accuracy is this machine's (another CPU may round differently).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

OUT = Path(__file__).resolve().parent.parent / "examples" / "data"
CALIB = 256  # training images kept for calibration


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class RepVGGBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.k3, self.k1 = conv_bn(cin, cout, 3, stride), conv_bn(cin, cout, 1, stride)
        self.identity = nn.BatchNorm2d(cout) if cin == cout and stride == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.k3(x) + self.k1(x)
        return torch.relu(y if self.identity is None else y + self.identity(x))


class LargeKernelBlock(nn.Module):
    def __init__(self, c: int, k: int = 7):
        super().__init__()
        self.large, self.small = conv_bn(c, c, k, groups=c), conv_bn(c, c, 3, groups=c)
        self.pointwise = conv_bn(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pointwise(torch.relu(self.large(x) + self.small(x)))


def network() -> nn.Module:
    return nn.Sequential(RepVGGBlock(1, 24), RepVGGBlock(24, 24), LargeKernelBlock(24), RepVGGBlock(24, 48, 2),
                         RepVGGBlock(48, 48), LargeKernelBlock(48, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(48, 10))


def main() -> None:
    torch.manual_seed(0)
    digits = load_digits()
    images = digits.images.astype(np.uint8)  # 8x8, values 0..16
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=450, random_state=0,
                                                        stratify=digits.target)
    model = network()
    xt, yt = torch.from_numpy(x_train[:, None] / 16.0).float(), torch.from_numpy(y_train).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test[:, None] / 16.0).float()).argmax(1).numpy() == y_test).mean()
    print(f"test accuracy {100 * acc:.2f} % (this machine)")
    OUT.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, (xt[:1],), OUT / "repvgg_digits_train.onnx", dynamo=False, do_constant_folding=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17)
    np.savez_compressed(OUT / "digits.npz", calib=x_train[:CALIB], x_test=x_test, y_test=y_test.astype(np.uint8))
    print(f"wrote {OUT / 'repvgg_digits_train.onnx'} and {OUT / 'digits.npz'}")


if __name__ == "__main__":
    main()
