"""A GFNet-like network whose global filters are true linear convolutions, computed by zero-padded FFT.

    python examples/global_filter.py [--size 14] [--dim 64] [--depth 4]

GFNet mixes the tokens of an H x W map by multiplying their 2-D FFT, taken at the map's size, with a learned
filter: a *circular* convolution, where the top row sees the bottom rows. Here each block's filter is a plain
depthwise ``nn.Conv2d`` whose (2H-1) x (2W-1) kernel lets every output see every input with zero padding: a
linear global convolution. lkfx's `fft_conv` pass computes those convs by FFT on a padded grid, exactly.

1. One filter, GFNet-style (FFT at the map size) vs padded FFT vs direct conv: for a kernel smaller than the map
   the circular result is wrong only in a border band; for a global kernel it is wrong everywhere but the
   centre; the padded FFT equals the conv.
2. The whole network through ``lkfx.transform(model, [("fft_conv", {"mode": "always"})], check=True)``.

Exits 1 if the padded FFT differs from direct conv by more than 1e-5 (max error / max |output|).
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn as nn

import lkfx
from lkfx.modules.fft_conv import FFTConv2d

TOL = 1e-5


class Block(nn.Module):
    def __init__(self, dim: int, size: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(1, dim)
        self.filter = nn.Conv2d(dim, dim, 2 * size - 1, padding=size - 1, groups=dim)  # global, linear
        self.norm2 = nn.GroupNorm(1, dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, 4 * dim, 1), nn.GELU(), nn.Conv2d(4 * dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.filter(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GlobalFilterNet(nn.Module):
    def __init__(self, size: int = 14, dim: int = 64, depth: int = 4, patch: int = 16, classes: int = 10):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*(Block(dim, size) for _ in range(depth)))
        self.norm = nn.GroupNorm(1, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(x))).mean((2, 3)))


def circular(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """GFNet-style: the FFT at the feature-map size. Tap (i, j) of the kernel reads x[o + i - p] with the index
    taken modulo the map: the kernel wraps onto an H x W circle."""
    h, w = x.shape[-2:]
    kh, kw = conv.kernel_size
    ph, pw = conv.padding
    c = conv.out_channels
    chans = torch.arange(c)[:, None, None].expand(c, kh, kw)
    rows = ((torch.arange(kh) - ph) % h)[None, :, None].expand(c, kh, kw)
    cols = ((torch.arange(kw) - pw) % w)[None, None, :].expand(c, kh, kw)
    wrapped = torch.zeros(c, h, w, dtype=x.dtype)
    wrapped.index_put_((chans, rows, cols), conv.weight[:, 0].detach(), accumulate=True)
    spec = torch.fft.rfft2(wrapped).conj()
    return torch.fft.irfft2(torch.fft.rfft2(x) * spec, s=(h, w)) + conv.bias.detach().view(1, -1, 1, 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def compare(conv: nn.Conv2d, x: torch.Tensor, label: str) -> float:
    """Print circular-vs-conv by distance to the border and padded-vs-conv; return the padded error."""
    with torch.no_grad():
        direct = conv(x)
        padded = FFTConv2d.from_conv(conv)(x)
        wrong = (circular(x, conv) - direct).abs().amax((0, 1))
    h, w = wrong.shape
    wrong = wrong / direct.abs().max()
    band = max(conv.padding)
    inner = wrong[band:h - band, band:w - band]
    print(f"{label}: kernel {conv.kernel_size[0]}x{conv.kernel_size[1]} on a {h}x{w} map (error / max |output|)")
    if inner.numel():
        border = wrong.clone()
        border[band:h - band, band:w - band] = 0
        print(f"  circular FFT at {h}x{w} (GFNet) vs conv: {float(border.max()):.3g} in the {band}-pixel border "
              f"band, {float(inner.max()):.3g} inside it")
    else:
        print(f"  circular FFT at {h}x{w} (GFNet) vs conv: wrong at every pixel ({float(wrong.min()):.3g} .. "
              f"{float(wrong.max()):.3g})")
    err = rel(padded, direct)
    print(f"  padded FFT (lkfx FFTConv2d) vs conv: {err:.3g}")
    return err


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=14, help="token map height and width (input is 16x larger)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    torch.manual_seed(0)

    x = torch.randn(2, args.dim, args.size, args.size)
    local = nn.Conv2d(args.dim, args.dim, 7, padding=3, groups=args.dim)
    errors = [compare(local, x, "local filter")]
    model = GlobalFilterNet(args.size, args.dim, args.depth).eval()
    errors.append(compare(model.blocks[0].filter, x, "global filter"))

    image = torch.randn(2, 3, 16 * args.size, 16 * args.size)
    out, report = lkfx.transform(model, [("fft_conv", {"mode": "always"})], example_inputs=(image,), check=True,
                                 return_report=True)
    print(report)
    with torch.no_grad():
        errors.append(rel(out(image), model(image)))
    print(f"network: {report['fft_conv'].rewritten} global filters computed by FFT; logits error {errors[-1]:.3g}")
    if max(errors) > TOL:
        print(f"FAIL: the padded FFT differs from direct conv ({max(errors):.3g} > {TOL:g})")
        return 1
    print(f"OK: the padded FFT equals direct conv within {TOL:g}; the circular FFT does not")
    return 0


if __name__ == "__main__":
    sys.exit(main())
