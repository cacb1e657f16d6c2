"""ReparamLargeKernelConv: the train form, its deploy conversion (exact in eval mode, fp32 max relative error
<= 1e-5), and the `preserving` initialisation that equals an existing depthwise conv."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOL, randomize_bn

from lkfx.compare import max_rel_error
from lkfx.modules.replk import DILATED_BRANCHES, ReparamLargeKernelConv, branches_for


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_rel_error([a.detach().numpy()], [b.detach().numpy()])


def block(*args, seed: int = 0, **kwargs) -> ReparamLargeKernelConv:
    torch.manual_seed(seed)
    return randomize_bn(ReparamLargeKernelConv(*args, **kwargs), seed).eval()


@pytest.mark.parametrize("kernel,kwargs,hw", [
    (31, {}, (14, 14)),  # RepLKNet: 31x31 + 5x5, kernel larger than the feature map
    (13, {"dilated": True}, (16, 15)),  # UniRepLKNet: 5, 7, 3, 3, 3 with dilations 1..5
    (7, {"dilated": True}, (9, 9)),
    (27, {"dilated": True}, (14, 14)),  # beyond the table: the K = 17 set
    (13, {"stride": 2}, (15, 16)),
    (9, {"small_kernels": (3, (3, 2), 7)}, (10, 10)),
])
def test_reparameterize_is_exact(kernel, kwargs, hw):
    b = block(8, kernel, **kwargs)
    x = torch.randn(2, 8, *hw)
    with torch.no_grad():
        train_form = b(x)
        conv = b.reparameterize()
        deploy = b(x)
    assert rel(train_form, deploy) <= TOL
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (kernel, kernel) and conv.groups == 8
    assert conv.bias is not None and not hasattr(b, "large") and not hasattr(b, "small")
    assert b.reparameterize() is conv, "a second call returns the same conv"


def test_branch_sets():
    assert branches_for(13, dilated=True) == [(5, 1), (7, 2), (3, 3), (3, 4), (3, 5)]
    assert branches_for(31, dilated=True) == list(DILATED_BRANCHES[17])
    assert branches_for(31) == [(5, 1)]
    assert branches_for(5, (3, 5, (3, 3))) == [(3, 1)], "the large kernel itself and too large branches are dropped"
    assert branches_for(3, dilated=True) == []
    with pytest.raises(ValueError, match="odd"):
        branches_for(13, (4,))
    with pytest.raises(ValueError, match="odd"):
        ReparamLargeKernelConv(8, 12)


@pytest.mark.parametrize("k,dilation,stride,kernel,kwargs", [
    (7, 1, 1, 31, {}),
    (7, 1, 1, 13, {"dilated": True}),
    (3, 2, 2, 13, {}),  # a dilated original becomes its dense 5x5, stride 2
    (5, 1, 2, 9, {"small_kernels": (3, 5)}),
])
def test_preserving_equals_the_original_conv(k, dilation, stride, kernel, kwargs):
    torch.manual_seed(1)
    w, bias = torch.randn(8, 1, k, k), torch.randn(8)
    x = torch.randn(2, 8, 13, 12)
    ref = F.conv2d(x, w, bias, stride, dilation * (k - 1) // 2, dilation, groups=8)
    b = ReparamLargeKernelConv.preserving(w, bias, kernel, stride=stride, dilation=(dilation, dilation),
                                          **kwargs).eval()
    with torch.no_grad():
        assert rel(ref, b(x)) <= TOL
        b.reparameterize()
        assert rel(ref, b(x)) <= TOL


def test_preserving_with_statistics_is_close_in_training_mode():
    """With the statistics of the original conv's output, the large branch's BN is (nearly) the identity on
    batches like the one measured, in training mode too; the small branches add exactly 0."""
    torch.manual_seed(2)
    w, bias = torch.randn(6, 1, 7, 7), torch.randn(6)
    x = torch.randn(4, 6, 12, 12)
    y = F.conv2d(x, w, None, padding=3, groups=6)
    stats = (y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False))
    b = ReparamLargeKernelConv.preserving(w, bias, 13, stats=stats).train()
    out = b(x)
    assert rel(y + bias[:, None, None], out) <= TOL
    out.square().mean().backward()
    small_bn = b.small[0].bn
    assert small_bn.weight.grad.abs().sum() > 0, "zero-initialised branch must still learn"
    assert b.small[0].conv.weight.grad.abs().sum() == 0  # gamma = 0 blocks it until gamma moves


def test_preserving_refuses_a_kernel_that_does_not_fit():
    with pytest.raises(ValueError, match="cannot be centred"):
        ReparamLargeKernelConv.preserving(torch.randn(4, 1, 9, 9), None, 7)
