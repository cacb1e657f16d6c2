"""`FFTConv2d`: a stride-1, zero-padded 2-D conv (dense or depthwise, any kernel size) computed by FFT, exactly.

PyTorch convs are cross-correlations: ``y[o] = b + sum_m w[m] x[o + m - p]`` per axis, x zero outside the map.
With the grid and crop of `lkfx.backends.fft_cost.fft_plan` (kernel taps that never reach the input dropped, the
kept kernel rolled by its begin padding on an N x M grid large enough that nothing wraps onto the input)::

    Y = rfft2(x, s=(N, M)) * conj(rfft2(roll(pad(w))))      (dense: summed over input channels per frequency)
    y = irfft2(Y, s=(N, M))[..., :Ho, :Wo] + b

is the linear ('same' / 'valid' / any padding <= k - 1) convolution, not the circular one that GFNet computes
at the feature-map size. N, M are even and 5-smooth, at least ``H + max(pad_top, pad_bottom)`` (resp. W): for
'same' padding about H + K/2 rather than H + K - 1, and at most 2H - 1 before rounding whatever the kernel.

Precision: the FFT runs in float32 at least (float16 / bfloat16 inputs are upcast and the output cast back once;
float64 stays float64). Its rounding error grows like ``eps * log2(N M)`` relative to the output's scale:
measured against a float64 conv, max |error| / max |output| <= 3e-7 in float32 for kernels 3..63 on maps 7..56,
dense and depthwise, as accurate as PyTorch's float32 direct conv on the same shapes (<= 1.1e-6); the tests
assert <= 1e-5 against F.conv2d.

Speed (inference, `apply_spectrum`): one axis at a time, the forward transform along W runs on the H input rows
only and the inverse along W on the Ho output rows only, the product is written in place, the bias goes into the
zero frequency, and the only copy is the crop into the output (channels-last when the input is: such inputs are
transformed in place of their strides, never made contiguous first). A depthwise conv's channels go through these
steps in chunks of about `CHUNK_BYTES` of spectrum, so that each chunk stays in cache. Measured on one thread of a
loaded 2-core x86 (batch 8, RepLKNet / SLaK depthwise shapes): 0.3-0.9x the time of a bare
``irfft2(rfft2(x, s) * spectrum, s)`` on the same grid for NCHW inputs (the bare sequence leaves the caches),
channels-last ones 1.0-1.5x their NCHW time (strided transforms).

Spectrum cache: the kernel spectrum depends only on the weight and the input size. It is kept and reused
whenever no gradient has to flow into the weight (``torch.no_grad()`` / ``inference_mode()``, or a frozen
weight), which is how eval-mode inference runs, and recomputed when the weight changes (another tensor, or an
in-place update, seen through the tensor's version counter), when the input size, dtype or device changes. With
autograd recording, the spectrum is recomputed each call so gradients reach the weight.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lkfx.backends.fft_cost import FFTPlan, fft_plan
from lkfx.graph.layout import memory_format_of

Pads = tuple[tuple[int, int], tuple[int, int]]


def conv_pads(padding: str | int | tuple[int, ...], kernel: tuple[int, int]) -> Pads:
    """(begin, end) zero padding per spatial axis for an nn.Conv2d-style `padding` (stride 1, dilation 1)."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)
    if isinstance(padding, int):
        padding = (padding, padding)
    if isinstance(padding, (tuple, list)) and len(padding) == 2 and all(isinstance(p, int) for p in padding):
        return tuple((p, p) for p in padding)
    raise ValueError(f"padding must be 'same', 'valid', an int or a pair of ints, got {padding!r}")


class FFTConv2d(nn.Module):
    """A conv computed by FFT. Holds the same `weight` (O, I/groups, kh, kw) and `bias` (O,) as nn.Conv2d (the
    very tensors, when given Parameters: tied weights stay tied). groups: 1 (dense) or the input channel count
    (depthwise, any channel multiplier). padding: 'same', 'valid', an int or a pair, at most kernel - 1."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 padding: str | int | tuple[int, int] = "same", groups: int = 1):
        super().__init__()
        if weight.ndim != 4:
            raise ValueError(f"weight must be (out, in/groups, kh, kw), got shape {tuple(weight.shape)}")
        out_ch, in_per_group = weight.shape[:2]
        if groups != 1 and in_per_group != 1:
            raise ValueError(f"groups={groups}: only dense (groups=1) and depthwise (one input channel per group) "
                             "convs are supported")
        if out_ch % groups:
            raise ValueError(f"{out_ch} output channels do not split into {groups} groups")
        self.kernel_size = (int(weight.shape[2]), int(weight.shape[3]))
        self.pads = conv_pads(padding, self.kernel_size)
        if any(p > k - 1 for k, pair in zip(self.kernel_size, self.pads, strict=True) for p in pair):
            raise ValueError(f"padding {padding!r} is larger than kernel - 1 for a {self.kernel_size} kernel")
        self.padding = padding
        self.groups = groups
        self.in_channels = in_per_group * groups
        self.out_channels = out_ch
        for name, t in (("weight", weight), ("bias", bias)):
            if t is None or isinstance(t, nn.Parameter):
                setattr(self, name, t)
            else:
                self.register_buffer(name, t)
        self._cache: tuple[Any, torch.Tensor] | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> FFTConv2d:
        """The FFT form of `conv`, sharing its weight and bias Parameters and its train/eval mode."""
        if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("only stride 1, dilation 1, zero-padded convs have an FFT form here")
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(conv.weight, conv.bias, padding, conv.groups).train(conv.training)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"padding={self.padding!r}, groups={self.groups}, bias={self.bias is not None}")

    def plan(self, in_size: tuple[int, int]) -> FFTPlan:
        return fft_plan(in_size, self.kernel_size, self.pads)

    def spectrum(self, plan: FFTPlan, dtype: torch.dtype) -> torch.Tensor:
        """`kernel_spectrum` of the weight, cached while no gradient must reach it."""
        w = self.weight
        key = (plan, dtype, w.device, id(w), w.data_ptr(), w._version, torch.is_inference_mode_enabled())
        reusable = not (torch.is_grad_enabled() and w.requires_grad)
        if reusable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        spec = kernel_spectrum(w, plan, dtype, self.groups)
        self._cache = (key, spec) if reusable else None
        return spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        plan = self.plan((int(x.shape[2]), int(x.shape[3])))
        return apply_spectrum(x, self.spectrum(plan, torch.promote_types(x.dtype, torch.float32)), self.bias, plan,
                              self.groups)


def kernel_spectrum(weight: torch.Tensor, plan: FFTPlan, dtype: torch.dtype, groups: int) -> torch.Tensor:
    """conj(rfft2) of the kept taps rolled on the grid: (O, I, N, M/2+1), depthwise (C, multiplier, ...)."""
    (h0, h1), (w0, w1) = plan.taps
    n, m = plan.size
    k = weight[:, :, h0:h1, w0:w1].to(dtype)
    k = nn.functional.pad(k, (0, m - k.shape[3], 0, n - k.shape[2]))
    spec = torch.fft.rfft2(torch.roll(k, (-plan.shift[0], -plan.shift[1]), (2, 3))).conj_physical()
    if groups > 1:
        spec = spec.reshape(groups, -1, *spec.shape[2:])
    return spec


CHUNK_BYTES = 2 << 20  # a depthwise FFT's channels go through the transforms in chunks of ~this much spectrum


def apply_spectrum(x: torch.Tensor, spec: torch.Tensor, bias: torch.Tensor | None, plan: FFTPlan,
                   groups: int) -> torch.Tensor:
    """The conv of `x` with the kernel whose `kernel_spectrum` is `spec`, plus `bias`, in the layout of `x`
    (channels-last in, channels-last out).

    The 2-D transforms are done one axis at a time so that zeros are neither copied nor transformed: the forward
    real FFT along W runs on the H input rows only (``n=M`` pads them), the inverse along H keeps only the ``Ho``
    output rows before the inverse real FFT along W. The bias is added to the zero frequency, ``Y[0, 0] += b N M``
    (a constant on the whole grid; with autograd recording it is added to the output instead, since the spectrum
    is not written in place then), so the only pass over the output is the crop into the result's layout.

    On CPU without autograd, a depthwise conv runs its channels in chunks whose spectrum (batch x chunk x N x
    M/2+1 complex) is about `CHUNK_BYTES`: each chunk's five steps then stay in cache instead of streaming a
    spectrum of tens of MB through memory five times (batch 8, 128 channels, 56x56, one thread: K31 1.3x, K63
    2.9x faster than unchunked). GPUs get one pass: there chunks would only add kernel launches."""
    n, m = plan.size
    channels, depthwise = x.shape[1], groups != 1
    per = spec.shape[1] if depthwise else 1  # output channels per input channel of a depthwise conv
    y = torch.empty((x.shape[0], spec.shape[0] * per, *plan.out), dtype=x.dtype, device=x.device,
                    memory_format=memory_format_of(x))
    chunk = max(1, CHUNK_BYTES // (x.shape[0] * n * (m // 2 + 1) * 2 * spec.real.dtype.itemsize))
    if torch.is_grad_enabled() or not depthwise or channels <= chunk or x.device.type != "cpu":
        return _transform(x, spec, bias, plan, depthwise, y)
    for c in range(0, channels, chunk):
        part = slice(c, min(c + chunk, channels))
        outs = slice(part.start * per, part.stop * per)
        _transform(x[:, part], spec[part], None if bias is None else bias[outs], plan, True, y[:, outs])
    return y


def _transform(x: torch.Tensor, spec: torch.Tensor, bias: torch.Tensor | None, plan: FFTPlan,
               depthwise: bool, out: torch.Tensor) -> torch.Tensor:
    """`apply_spectrum` on all of `x` at once, the result cropped into `out`; `spec` laid out as `kernel_spectrum`
    does for `depthwise`."""
    dtype = spec.real.dtype
    n, m = plan.size
    ho, wo = plan.out
    inplace = not torch.is_grad_enabled()
    xf = torch.fft.fft(torch.fft.rfft(x.to(dtype), n=m, dim=3), n=n, dim=2)
    if not depthwise:
        yf = torch.einsum("bihw,oihw->bohw", xf, spec)
    elif spec.shape[1] == 1:
        yf = xf.mul_(spec[:, 0]) if inplace else xf * spec[:, 0]
    else:
        yf = (xf.unsqueeze(2) * spec).flatten(1, 2)
    bias_in_spectrum = bias is not None and inplace
    if bias_in_spectrum:
        yf[:, :, 0, 0] += bias.to(dtype) * (n * m)
    y = torch.fft.irfft(torch.fft.ifft(yf, dim=2)[:, :, :ho], n=m, dim=3)[..., :wo]
    if bias is not None and not bias_in_spectrum:
        y = y + bias.to(dtype).view(1, -1, 1, 1)
    return out.copy_(y)


def fft_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               padding: str | int | tuple[int, int] = "same", groups: int = 1) -> torch.Tensor:
    """Functional `FFTConv2d` (no spectrum cache): ``F.conv2d(x, weight, bias, 1, padding, 1, groups)`` by FFT.
    Any tensors, including graph inputs of an ATen graph: gradients reach x, weight and bias."""
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    plan = fft_plan((int(x.shape[2]), int(x.shape[3])), kernel, conv_pads(padding, kernel))
    spec = kernel_spectrum(weight, plan, torch.promote_types(x.dtype, torch.float32), groups)
    return apply_spectrum(x, spec, bias, plan, groups)
