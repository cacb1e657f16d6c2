"""Fake-quant math, straight-through gradients, per-channel weight scales, the QAT conv + BN fold."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import (
    ConvBnFakeQuant,
    FakeQuant,
    WeightFakeQuant,
    fake_quantize,
    fake_quantize_weight,
    freeze_bn,
    weight_scale,
)
from lkfx.quant.qparams import qparams, quant_range


def reference(x, scale, zp, qmin, qmax):
    """quantize -> dequantize, written out."""
    q = torch.clamp(torch.round(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


@pytest.mark.parametrize(("bits", "symmetric"), [(8, False), (8, True), (4, False), (4, True)])
def test_forward_is_quantize_dequantize(bits, symmetric):
    x = torch.linspace(-3, 5, 10_001)
    scale, zp = qparams(torch.tensor(-2.0), torch.tensor(4.0), bits=bits, symmetric=symmetric)
    qmin, qmax = quant_range(bits, symmetric)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    assert torch.allclose(out, reference(x, scale, zp, qmin, qmax), atol=1e-6)
    assert len(torch.unique(out)) <= qmax - qmin + 1


def test_straight_through_gradient():
    x = torch.linspace(-3, 5, 1001, requires_grad=True)
    scale, zp = qparams(torch.tensor(-1.0), torch.tensor(2.0))
    fake_quantize(x, scale, zp, 0, 255).sum().backward()
    lo, hi = (0 - zp.item()) * scale.item(), (255 - zp.item()) * scale.item()
    inside = (x.detach() >= lo) & (x.detach() <= hi)
    assert torch.equal(x.grad, inside.float())  # 1 inside the grid, 0 where clamped
    x.grad = None
    fake_quantize(x, scale, zp, 0, 15).sum().backward()  # 4 bits: the clamp gives the same STE
    assert x.grad[x.detach() > (15 - zp.item()) * scale.item() + 1e-6].sum() == 0


def test_weight_scales_per_channel_for_depthwise():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1, 9).float().reshape(8, 1, 1, 1))  # very different channel ranges
    scale = weight_scale(conv.weight, 8)
    assert scale.shape == (8,)
    assert torch.allclose(scale, conv.weight.detach().abs().amax((1, 2, 3)) / 127)
    wq = WeightFakeQuant(8)(conv.weight)
    for c in range(8):
        assert torch.allclose(wq[c], reference(conv.weight[c].detach(), scale[c], 0, -127, 127), atol=1e-7)
        assert len(torch.unique(wq[c])) <= 9  # each channel on its own grid
    w4 = fake_quantize_weight(conv.weight, 4)
    assert ((w4 / weight_scale(conv.weight, 4).reshape(8, 1, 1, 1)).round().abs() <= 7).all()
    wq.sum().backward()  # STE to the weight
    assert torch.equal(conv.weight.grad, torch.ones_like(conv.weight))


def test_activation_quantizer_states():
    fq = FakeQuant(bits=8)
    with pytest.raises(LkfxError, match="calibrate"):
        fq(torch.ones(2))
    fq.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    x = torch.linspace(-2, 2, 101)
    assert torch.equal(fq(x), fake_quantize(x, fq.scale, fq.zero_point, 0, 255))
    fresh = FakeQuant(bits=8)
    fresh.load_state_dict(fq.state_dict())  # ranges travel with the state dict
    assert torch.equal(fresh(x), fq(x))
    qat = FakeQuant(qat=True, momentum=0.5).train()
    qat(torch.tensor([0.0, 2.0]))
    qat(torch.tensor([-2.0, 4.0]))
    assert (qat.lo.item(), qat.hi.item()) == (-1.0, 3.0)  # moving average of batch ranges


def make_conv_bn(groups=1, bias=False, seed=0):
    torch.manual_seed(seed)
    conv = nn.Conv2d(8, 16 if groups == 1 else 8, 3, padding=1, groups=groups, bias=bias)
    bn = nn.BatchNorm2d(conv.out_channels)
    randomize_bn(nn.Sequential(bn), seed)
    return conv, bn


@pytest.mark.parametrize(("groups", "bias"), [(1, False), (8, True)])
def test_qat_conv_bn_eval_matches_folded_conv_bn(groups, bias):
    conv, bn = make_conv_bn(groups, bias)
    ref = nn.Sequential(copy.deepcopy(conv), copy.deepcopy(bn)).eval()
    fused = ConvBnFakeQuant(conv, bn, bits=8).eval()
    x = torch.randn(4, 8, 10, 10)
    with torch.no_grad():
        k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w = conv.weight * k.reshape(-1, 1, 1, 1)
        b = bn.bias + ((conv.bias if bias else 0) - bn.running_mean) * k
        s = w.abs().amax((1, 2, 3)) / 127
        wq = reference(w, s.reshape(-1, 1, 1, 1), 0, -127, 127)
        expected = F.conv2d(x, wq, b, padding=1, groups=groups)
        out = fused(x)
        assert torch.allclose(out, expected, atol=1e-5)  # eval: the folded, quantized conv inference runs
        y = ref(x)
        assert (out - y).abs().max() <= 0.02 * y.abs().max()  # = conv -> BN up to int8 weight rounding


def test_qat_conv_bn_training_normalises_with_batch_statistics():
    conv, bn = make_conv_bn()
    ref_conv, ref_bn = copy.deepcopy(conv), copy.deepcopy(bn)
    fused = ConvBnFakeQuant(conv, bn).train()
    x = torch.randn(8, 8, 6, 6)
    out = fused(x)
    ref = ref_bn.train()(ref_conv(x))
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()  # BN_batch(conv(x, fq(kW)) / k)
    mean = out.mean((0, 2, 3))
    assert torch.allclose(mean, bn.bias, atol=1e-4)  # batch-normalised output
    assert torch.allclose(bn.running_mean, ref_bn.running_mean, atol=0.02 * ref_bn.running_mean.abs().max())
    out.sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None and bn.bias.grad is not None
    seen = bn.num_batches_tracked.item()
    assert freeze_bn(nn.Sequential(fused)) == 1
    stats = bn.running_mean.clone()
    frozen = fused(x)
    assert bn.num_batches_tracked.item() == seen and torch.equal(bn.running_mean, stats)  # statistics frozen
    assert torch.allclose(frozen, fused.eval()(x))  # frozen training = inference form
