"""FFTConv2d equals F.conv2d (fp32 max error relative to the output's max |value| <= 1e-5) for odd and even
kernels smaller than, equal to and larger than the map, non-square maps, dense and depthwise convs, with and
without bias; its gradients equal direct conv's; the kernel spectrum is reused when no gradient needs it and
recomputed when the weight, the input size or the dtype changes; the FFT grid obeys its plan."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfx.backends.fft_cost import ONNX_RADICES, fast_size, fft_plan
from lkfx.modules.fft_conv import FFTConv2d, conv_pads

TOL = 1e-5


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def make(c_in: int, c_out: int, kernel: tuple[int, int], groups: int, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in // groups, *kernel, generator=gen)
    b = torch.randn(c_out, generator=gen) if bias else None
    return w, b


# (map H, W), kernel, padding: K < H, K = H, K > H (also > 2H - 1, where taps are cropped), even / odd, non-square
CASES = [
    ((16, 16), (7, 7), "same"), ((16, 16), (7, 7), 3), ((16, 16), (6, 6), "same"), ((16, 16), (7, 7), "valid"),
    ((15, 15), (15, 15), "same"), ((14, 14), (14, 14), "same"), ((9, 9), (13, 13), "same"),
    ((7, 7), (31, 31), "same"), ((7, 7), (30, 30), "same"), ((12, 20), (5, 9), "same"), ((12, 20), (13, 21), "same"),
    ((9, 17), (12, 4), "same"), ((11, 6), (11, 6), "valid"), ((10, 13), (7, 9), (2, 4)), ((5, 5), (63, 63), "same"),
]


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("size,kernel,padding", CASES)
@pytest.mark.parametrize("kind", ["depthwise", "depthwise_x2", "dense"])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_conv2d(size, kernel, padding, kind, bias):
    c = 6
    groups = 1 if kind == "dense" else c
    c_out = {"depthwise": c, "depthwise_x2": 2 * c, "dense": 5}[kind]
    w, b = make(c, c_out, kernel, groups, bias)
    x = torch.randn(2, c, *size, generator=torch.Generator().manual_seed(1))
    ref = F.conv2d(x, w, b, padding=padding, groups=groups)
    m = FFTConv2d(w, b, padding, groups).eval()
    with torch.no_grad():
        out = m(x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert rel_err(out, ref) <= TOL


@pytest.mark.parametrize("kind", ["depthwise", "dense"])
def test_gradients_match_direct(kind):
    c = 4
    groups = c if kind == "depthwise" else 1
    conv = nn.Conv2d(c, c, 11, padding=5, groups=groups)
    fft = copy.deepcopy(conv)
    fft = FFTConv2d.from_conv(fft).train()
    x = torch.randn(3, c, 9, 12, generator=torch.Generator().manual_seed(2))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(3, c, 9, 12, generator=torch.Generator().manual_seed(3))
    ((conv(x1) - target) ** 2).sum().backward()
    ((fft(x2) - target) ** 2).sum().backward()
    assert rel_err(x2.grad, x1.grad) <= TOL
    assert rel_err(fft.weight.grad, conv.weight.grad) <= TOL
    assert rel_err(fft.bias.grad, conv.bias.grad) <= TOL
    assert fft._cache is None, "with autograd recording the spectrum is recomputed each call, not cached"


def test_spectrum_cached_without_grad_and_invalidated_on_change():
    conv = nn.Conv2d(3, 3, 9, padding=4, groups=3)
    m = FFTConv2d.from_conv(conv).eval()
    x = torch.randn(1, 3, 10, 10)
    plan = m.plan((10, 10))
    with torch.no_grad():
        s1 = m.spectrum(plan, torch.float32)
        assert m.spectrum(plan, torch.float32) is s1, "reused while the weight is unchanged"
        m(x)
        assert m.spectrum(plan, torch.float32) is s1
        m.weight.mul_(2)  # in-place update: the version counter moves
        s2 = m.spectrum(plan, torch.float32)
        assert s2 is not s1 and torch.allclose(s2, 2 * s1, rtol=1e-5, atol=1e-5)
        assert rel_err(m(x), F.conv2d(x, m.weight, m.bias, padding=4, groups=3)) <= TOL
        m.weight = nn.Parameter(torch.randn(3, 1, 9, 9))  # another tensor
        assert rel_err(m(x), F.conv2d(x, m.weight, m.bias, padding=4, groups=3)) <= TOL
        s3 = m.spectrum(plan, torch.float32)
        assert m.spectrum(m.plan((12, 10)), torch.float32) is not s3, "another input size: another grid"
        assert m.spectrum(plan, torch.float64).dtype == torch.complex128
    with torch.inference_mode():
        s4 = m.spectrum(plan, torch.float32)
        assert m.spectrum(plan, torch.float32) is s4
    # eval mode with autograd recording: still correct gradients for the weight
    y = m(x)
    y.sum().backward()
    assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_frozen_weight_caches_with_grad_enabled():
    m = FFTConv2d(torch.randn(2, 1, 7, 7), None, "same", 2)  # a buffer: no gradient needed
    x = torch.randn(1, 2, 8, 8, requires_grad=True)
    plan = m.plan((8, 8))
    m(x).sum().backward()
    assert m.spectrum(plan, torch.float32) is m.spectrum(plan, torch.float32)
    assert x.grad is not None


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-12)])
def test_low_and_high_precision_inputs(dtype, tol):
    """float16 / bfloat16 are computed in float32 and rounded once; float64 stays float64."""
    w, b = make(4, 4, (15, 15), 4, True)
    x = torch.randn(2, 4, 12, 12)
    ref = F.conv2d(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), padding="same", groups=4)
    m = FFTConv2d(w.to(dtype), b.to(dtype), "same", 4)
    with torch.no_grad():
        out = m(x.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) <= tol


def test_from_conv_shares_parameters_and_state_dict():
    conv = nn.Conv2d(4, 8, 7, padding=3, groups=4, bias=True)
    m = FFTConv2d.from_conv(conv)
    assert m.weight is conv.weight and m.bias is conv.bias
    assert m.state_dict().keys() == conv.state_dict().keys()
    assert "groups=4" in repr(m)
    clone = copy.deepcopy(m)
    with torch.no_grad():
        x = torch.randn(1, 4, 9, 9)
        assert rel_err(clone(x), conv(x)) <= TOL


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="only dense"):
        FFTConv2d(torch.randn(4, 2, 3, 3), None, "same", 2)
    with pytest.raises(ValueError, match="larger than kernel - 1"):
        FFTConv2d(torch.randn(4, 4, 3, 3), None, 3)
    with pytest.raises(ValueError, match="stride 1"):
        FFTConv2d.from_conv(nn.Conv2d(4, 4, 3, stride=2))
    with pytest.raises(ValueError, match="expected input"):
        FFTConv2d(torch.randn(4, 4, 3, 3))(torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("n,k", [(7, 13), (14, 27), (28, 29), (56, 31), (56, 63), (5, 63), (16, 6), (13, 1)])
def test_plan_grid(n, k):
    pads = conv_pads("same", (k, k))
    p = fft_plan((n, n), (k, k), pads)
    (lo, hi), s, size = p.taps[0], p.shift[0], p.size[0]
    assert p.out == (n, n)
    assert size == fast_size(size) and size >= max(n + s, hi - lo)
    assert hi - lo <= min(k, 2 * n - 1), "taps that never reach the input are cropped"
    assert size <= fast_size(n + k - 1), "never larger than the textbook H + K - 1 grid"
    assert all(f in (2, 3, 5) for f in _factors(size))
    q = fft_plan((n, n), (k, k), pads, ONNX_RADICES)
    assert q.size[0] & (q.size[0] - 1) == 0 and q.size[0] >= size


def _factors(n: int) -> list[int]:
    out, f = [], 2
    while n > 1:
        while n % f == 0:
            out.append(f)
            n //= f
        f += 1
    return out


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_channels_last_in_channels_last_out(grad, bias):
    """A channels-last input is read as it is and the output has its layout; NCHW stays NCHW; with and without
    autograd recording (the bias goes into the spectrum only without)."""
    w, b = make(8, 8, (9, 9), 8, bias)
    x = torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1))
    m = FFTConv2d(w, b, "same", 8)
    ref = F.conv2d(x, w, b, padding="same", groups=8)
    for inp, layout in ((x, torch.contiguous_format), (x.contiguous(memory_format=torch.channels_last),
                                                        torch.channels_last)):
        with torch.set_grad_enabled(grad):
            out = m(inp)
        assert out.is_contiguous(memory_format=layout) and rel_err(out, ref) <= TOL


@pytest.mark.parametrize("multiplier", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_depthwise_channel_chunks_equal_one_pass(monkeypatch, multiplier, channels_last, dtype):
    """Without autograd a depthwise conv runs its channels in chunks (~CHUNK_BYTES of spectrum each): with chunks
    of 2 channels over 7 (a short last chunk), a channel multiplier, a bias in each chunk's spectrum and either
    layout, the output equals the direct conv in the input's layout and dtype."""
    import lkfx.modules.fft_conv as fft_conv

    w, b = make(7, 7 * multiplier, (9, 9), 7, True)
    x = torch.randn(3, 7, 10, 10, generator=torch.Generator().manual_seed(2))
    ref = F.conv2d(x, w, b, padding="same", groups=7)
    plan = fft_plan((10, 10), (9, 9), conv_pads("same", (9, 9)))
    monkeypatch.setattr(fft_conv, "CHUNK_BYTES", 2 * 3 * plan.size[0] * (plan.size[1] // 2 + 1) * 8)
    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    m = FFTConv2d(w.to(dtype), b.to(dtype), "same", 7)
    with torch.no_grad():
        out = m(inp.to(dtype))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert out.dtype == dtype and out.is_contiguous(memory_format=layout)
    assert rel_err(out, ref) <= (TOL if dtype == torch.float32 else 2e-3)
