"""FFTConv2d on a GPU (cuFFT): forward and backward against F.conv2d in float64 on the same device, depthwise and
dense, odd and even kernels larger than the map; fp32 within 1e-5 (max-normalised), fp16 / bf16 inputs within the
bounds the module documents for the CPU (2e-3 / 1e-2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfx.modules.fft_conv import FFTConv2d

# (channels in, channels out, groups, map, kernel, padding)
CASES = {
    "dw_56_k31": (32, 32, 32, 56, 31, 15),
    "dw_14_k27": (64, 64, 64, 14, 27, 13),
    "dw_7_k31_larger_than_map": (16, 16, 16, 7, 31, 15),
    "dw_28_k10_same": (8, 8, 8, 28, 10, "same"),
    "dense_32_k13": (8, 16, 1, 32, 13, 6),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_backward_fp32(case):
    c_in, c_out, groups, size, k, padding = case
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, padding=padding, groups=groups).cuda()
    fft = FFTConv2d.from_conv(conv)
    x = torch.randn(2, c_in, size, size, device="cuda", requires_grad=True)
    y = fft(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    wr = conv.weight.detach().double().requires_grad_()
    br = conv.bias.detach().double().requires_grad_()
    ref = F.conv2d(xr, wr, br, padding=padding, groups=groups)
    ref.backward(dy.double())
    assert rel_err(y, ref) <= 1e-5
    assert rel_err(x.grad, xr.grad) <= 1e-5
    assert rel_err(fft.weight.grad, wr.grad) <= 1e-5
    assert rel_err(fft.bias.grad, br.grad) <= 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_inference(dtype, tol):
    torch.manual_seed(1)
    conv = nn.Conv2d(32, 32, 31, padding=15, groups=32).cuda()
    x = torch.randn(2, 32, 32, 32, device="cuda")
    ref = F.conv2d(x.to(dtype).double(), conv.weight.to(dtype).double(), conv.bias.to(dtype).double(), padding=15,
                   groups=32)
    with torch.no_grad():
        out = FFTConv2d.from_conv(conv.to(dtype))(x.to(dtype))
    assert out.dtype == dtype and out.is_cuda
    assert rel_err(out, ref) <= tol
