"""The Triton depthwise kernels on a real GPU: forward, grad input and grad weight against a float64 reference
(``F.conv2d`` of the same, already rounded inputs, on the GPU), with cuDNN's own error in the same dtype beside it.

Bounds (max |error| / max |reference|), the ones the kernels document (`lkfx.backends.dwconv_triton`, tested on the
CPU under ``TRITON_INTERPRET=1`` too): fp32 1e-5; fp16 1e-3 and bf16 1e-2 for the output and the input gradient (one
rounding of the fp32 accumulator); the weight gradient comes back in fp32, 1e-5 in every dtype. The kernels are
autotuned, so each case runs whatever configuration Triton picked on this GPU — the Toeplitz (tl.dot) forward
included; fp32 dots use IEEE precision, so fp32 has no TF32 allowance.

The grid covers strides 1 and 2, odd, even and rectangular kernels up to 63, maps from 7 to 64, channels that are
not a multiple of any block, asymmetric ('same' with an even kernel) and no padding; then the op
``torch.ops.lkfx.dwconv2d`` end to end (autograd, fp16 parameters)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# (batch, channels, H, W, (KH, KW), (sh, sw), (top, left, bottom, right))
CASES = {
    "map7_k3": (4, 48, 7, 7, (3, 3), (1, 1), (1, 1, 1, 1)),
    "map7_k13": (4, 37, 7, 7, (13, 13), (1, 1), (6, 6, 6, 6)),
    "map7_k31_stride2": (2, 40, 7, 7, (31, 31), (2, 2), (15, 15, 15, 15)),
    "map14_k4_same": (2, 64, 14, 14, (4, 4), (1, 1), (1, 1, 2, 2)),
    "map16_k31": (2, 96, 16, 16, (31, 31), (1, 1), (15, 15, 15, 15)),
    "map28_k29_stride2": (2, 33, 28, 28, (29, 29), (2, 2), (14, 14, 14, 14)),
    "map32_k9": (2, 64, 32, 32, (9, 9), (1, 1), (4, 4, 4, 4)),
    "map33_k10_same_stride2": (2, 24, 33, 31, (10, 10), (2, 2), (4, 4, 5, 5)),
    "map56_k31": (1, 32, 56, 56, (31, 31), (1, 1), (15, 15, 15, 15)),
    "map64_k63": (1, 16, 64, 64, (63, 63), (1, 1), (31, 31, 31, 31)),
    "map64_k7x5_valid": (2, 24, 64, 60, (7, 5), (1, 1), (0, 0, 0, 0)),
    "map64_k3_stride2": (2, 48, 64, 64, (3, 3), (2, 2), (1, 1, 1, 1)),
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


def _inputs(case: tuple, dtype: torch.dtype, seed: int):
    n, c, h, w, kernel, stride, pads = case
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, c, h, w, device="cuda", generator=gen).to(dtype)
    weight = torch.randn(c, 1, *kernel, device="cuda", generator=gen).div(kernel[0] * kernel[1] ** 0.5).to(dtype)
    bias = torch.randn(c, device="cuda", generator=gen).to(dtype)
    return x, weight, bias, stride, pads


def _reference(x, weight, bias, stride, pads):
    """(y, conv) in float64 on the GPU; conv(xr, wr) for autograd."""
    pt, pl, pb, pr = pads
    c = x.shape[1]

    def conv(xr, wr, b=bias):
        return F.conv2d(F.pad(xr, (pl, pr, pt, pb)), wr, None if b is None else b.double(), stride, groups=c)

    return conv


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_kernels_match_float64(case, dtype):
    from lkfx.backends import dwconv_triton

    x, weight, bias, stride, pads = _inputs(case, dtype, seed=hash(case) % 1000)
    conv = _reference(x, weight, bias, stride, pads)
    xr = x.double().requires_grad_()
    wr = weight.double().requires_grad_()
    ref = conv(xr, wr)
    gen = torch.Generator(device="cuda").manual_seed(7)
    dy = torch.randn(ref.shape, device="cuda", generator=gen).to(dtype)
    gx, gw = torch.autograd.grad(ref, (xr, wr), dy.double())
    ref = ref.detach()

    y = dwconv_triton.forward(x, weight, bias, stride, pads)
    dx = dwconv_triton.grad_input(dy, weight, tuple(x.shape[2:]), stride, pads)
    dw = dwconv_triton.grad_weight(dy, x, tuple(weight.shape[2:]), stride, pads)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert torch.isfinite(y).all() and torch.isfinite(dx).all() and torch.isfinite(dw).all()

    tol = TOL[dtype]
    pt, pl, pb, pr = pads
    cudnn = F.conv2d(F.pad(x, (pl, pr, pt, pb)), weight, bias, stride, groups=x.shape[1])
    errors = {"y": rel_err(y, ref), "dx": rel_err(dx, gx), "dw": rel_err(dw, gw), "cudnn_y": rel_err(cudnn, ref)}
    print(f"errors vs float64: {errors}; forward config {dwconv_triton._forward_kernel.best_config}")
    assert errors["y"] <= tol, errors
    assert errors["dx"] <= tol, errors
    assert errors["dw"] <= 1e-5, errors


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_op_autograd_matches_cudnn(dtype):
    """torch.ops.lkfx.dwconv2d with parameters in `dtype`: output and all three gradients against cuDNN's conv on
    the same tensors, both measured against float64 (the weight gradient is rounded to the weight's dtype)."""
    import lkfx.backends.dwconv_op  # noqa: F401  (registers the op)

    x, weight, bias, stride, pads = _inputs((4, 64, 32, 32, (31, 31), (1, 1), (15, 15, 15, 15)), dtype, seed=3)
    conv = _reference(x, weight, bias, stride, pads)
    leaves = [t.detach().requires_grad_() for t in (x, weight, bias)]
    y = torch.ops.lkfx.dwconv2d(*leaves, list(stride), list(pads))
    dy = torch.randn_like(y)
    y.backward(dy)
    refs = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    ref = conv(refs[0], refs[1], refs[2])
    ref.backward(dy.double())
    tol = TOL[dtype]
    assert rel_err(y, ref) <= tol
    for got, want in zip(leaves, refs, strict=True):
        assert got.grad.dtype == dtype
        assert rel_err(got.grad, want.grad) <= tol, (got.shape, rel_err(got.grad, want.grad))
