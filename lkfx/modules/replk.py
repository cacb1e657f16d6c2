"""RepLKNet-style reparameterisable large-kernel depthwise conv, with UniRepLKNet's optional dilated branches.

Training form: a large KxK depthwise conv + BN in parallel with small depthwise convs + BN (default one 5x5;
with ``dilated=True`` UniRepLKNet's set, e.g. for K = 13 kernels 5, 7, 3, 3, 3 with dilations 1, 2, 3, 4, 5),
each padded 'same' (``d (k - 1) / 2``), outputs summed::

    x ─┬─ DW KxK ─────── BN ─┐
       ├─ DW 5x5 ─────── BN ─┼─ + ── y           deploy:   x ── DW KxK (W, b) ── y
       └─ DW 3x3, d=2 ── BN ─┘

Deploy form (`reparameterize`): each BN folds into its conv (``s = gamma / sqrt(var + eps)``, ``W' = s W``,
``b' = beta - mean s``); a k x k kernel with dilation d becomes a dense ``(k - 1) d + 1`` kernel with zeros between
the taps; it is zero-padded into the centre of the KxK kernel (offset ``(K - (k - 1) d - 1) / 2``, exact because
every kernel is odd and 'same'-padded) and the biases are summed. Computed in float64, cast back.

`ReparamLargeKernelConv.preserving` builds a block equal, in eval mode, to an existing depthwise conv: its kernel
centred in the large one, the large BN the identity on the statistics of that conv's output (running mean m and
variance v, ``gamma = sqrt(v + eps)``, ``beta = m + bias``: also close to the identity in training mode while the
batch statistics stay near m, v), and each small branch's BN with ``gamma = beta = 0``, so it adds exactly 0 yet
still receives gradients (through gamma) when fine-tuning starts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn

from lkfx import kernel_math as km

# UniRepLKNet's dilated branches (kernel, dilation) per large kernel size; larger kernels use the K = 17 set.
DILATED_BRANCHES: dict[int, tuple[tuple[int, int], ...]] = {
    5: ((3, 1), (3, 2)),
    7: ((5, 1), (3, 2), (3, 3)),
    9: ((5, 1), (5, 2), (3, 3), (3, 4)),
    11: ((5, 1), (5, 2), (3, 3), (3, 4), (3, 5)),
    13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)),
    15: ((5, 1), (7, 2), (3, 3), (3, 5), (3, 7)),
    17: ((5, 1), (9, 2), (3, 4), (3, 5), (3, 7)),
}


def branches_for(kernel_size: int, small_kernels: Sequence[int | tuple[int, int]] = (5,),
                 dilated: bool = False) -> list[tuple[int, int]]:
    """The (kernel, dilation) of each small branch: UniRepLKNet's set with `dilated`, else `small_kernels`
    (ints or (kernel, dilation) pairs). Branches larger than `kernel_size` (dense) or equal to the large kernel
    are dropped."""
    if dilated:
        chosen = DILATED_BRANCHES.get(kernel_size, DILATED_BRANCHES[17] if kernel_size > 17 else ())
    else:
        chosen = [(k, 1) if isinstance(k, int) else tuple(k) for k in small_kernels]
    for k, d in chosen:
        if k % 2 == 0 or k < 1 or d < 1:
            raise ValueError(f"small branch ({k}, dilation {d}): kernels must be odd and dilations >= 1")
    return [(k, d) for k, d in chosen if (k - 1) * d + 1 <= kernel_size and (k, d) != (kernel_size, 1)]


def _conv_bn(channels: int, k: int, d: int, stride: int) -> nn.Sequential:
    conv = nn.Conv2d(channels, channels, k, stride, d * (k - 1) // 2, dilation=d, groups=channels, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(channels)))


class ReparamLargeKernelConv(nn.Module):
    """Depthwise KxK conv + BN, plus small depthwise conv + BN branches, summed; `reparameterize()` merges them."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1,
                 small_kernels: Sequence[int | tuple[int, int]] = (5,), dilated: bool = False):
        super().__init__()
        if kernel_size % 2 == 0 or kernel_size < 3:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.channels, self.kernel_size, self.stride = channels, kernel_size, stride
        self.branches = branches_for(kernel_size, small_kernels, dilated)
        self.large = _conv_bn(channels, kernel_size, 1, stride)
        self.small = nn.ModuleList(_conv_bn(channels, k, d, stride) for k, d in self.branches)
        self.reparam_conv: nn.Conv2d | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        out = self.large(x)
        for branch in self.small:
            out = out + branch(x)
        return out

    def merged_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the single conv equal to the block in eval mode, in float64."""
        size = (self.kernel_size, self.kernel_size)
        weight = bias = None
        for seq in (self.large, *self.small):
            conv, bn = seq.conv, seq.bn
            s, t = km.bn_scale_shift(bn.running_mean.double(), bn.running_var.double(),
                                     bn.weight.double(), bn.bias.double(), bn.eps)
            w, b = km.fold_scale_after(conv.weight.detach().double(), None, s, t)
            dense = km.dilate_kernel(w, tuple(conv.dilation))
            offset = tuple((self.kernel_size - k) // 2 for k in dense.shape[2:])
            placed = km.place_kernel(dense, size, offset)
            weight, bias = (placed, b) if weight is None else (weight + placed, bias + b)
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> nn.Conv2d:
        """Become the deploy form (one depthwise conv with bias) and return that conv (timm's protocol)."""
        if self.reparam_conv is None:
            ref = self.large.conv.weight
            weight, bias = self.merged_kernel()
            conv = nn.Conv2d(self.channels, self.channels, self.kernel_size, self.stride, self.kernel_size // 2,
                             groups=self.channels, bias=True, device=ref.device, dtype=ref.dtype)
            conv.weight.copy_(weight)
            conv.bias.copy_(bias)
            self.reparam_conv = conv
            del self.large, self.small
        return self.reparam_conv

    @classmethod
    @torch.no_grad()
    def preserving(cls, weight: torch.Tensor, bias: torch.Tensor | None, kernel_size: int, *, stride: int = 1,
                   dilation: Sequence[int] = (1, 1), small_kernels: Sequence[int | tuple[int, int]] = (5,),
                   dilated: bool = False, stats: tuple[torch.Tensor, torch.Tensor] | None = None,
                   ) -> ReparamLargeKernelConv:
        """A block that computes, in eval mode, what the depthwise conv (weight, bias, dilation, 'same' padding
        of an odd kernel) computes. `stats`: per-channel mean and variance of that conv's output without its
        bias (e.g. measured on example inputs); default 0 and 1."""
        channels = weight.shape[0]
        block = cls(channels, kernel_size, stride, small_kernels, dilated).to(device=weight.device,
                                                                              dtype=weight.dtype)
        dense = km.dilate_kernel(weight.detach(), tuple(dilation))
        if any(k % 2 == 0 or k > kernel_size for k in dense.shape[2:]):
            raise ValueError(f"a dense {tuple(dense.shape[2:])} kernel cannot be centred in a {kernel_size} kernel")
        offset = tuple((kernel_size - k) // 2 for k in dense.shape[2:])
        block.large.conv.weight.copy_(km.place_kernel(dense, (kernel_size, kernel_size), offset))
        mean, var = stats if stats is not None else (torch.zeros(channels), torch.ones(channels))
        mean, var = mean.to(weight), var.to(weight)
        bn = block.large.bn
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var.double() + bn.eps).sqrt())
        bn.bias.copy_(mean if bias is None else mean + bias.detach())
        for branch in block.small:
            nn.init.zeros_(branch.bn.weight)
            nn.init.zeros_(branch.bn.bias)
        return block

    def extra_repr(self) -> str:
        small = ", ".join(f"{k}x{k}" + (f" d{d}" if d > 1 else "") for k, d in self.branches)
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, small=[{small}], "
                f"deployed={self.reparam_conv is not None}")
