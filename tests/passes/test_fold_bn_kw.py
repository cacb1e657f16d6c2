"""fold_bn after KernelWarehouse convs: the BatchNorm becomes the KWConv's affine map (its cells are shared, so
they cannot take the scale: it goes into the per-sample kernels or onto the output, the shift into the bias).
Exact to fp32 rounding (<= 1e-6 relative) on every conv path (bmm 1x1, per-sample dense and depthwise convs,
batch-folded depthwise, a Linear), in both layouts, with and without autograd (in place / out of place), exported
to ONNX; refusals name their reason."""

from __future__ import annotations

import copy

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from helpers import TOL, assert_same_outputs, fx_bn_nodes, randomize_bn, reasons

import lkfx
from lkfx.compare import max_rel_error
from lkfx.graph.fx import trace
from lkfx.modules.kernel_warehouse import KWConv, convert_convs, mark_interleaved


def kw_net(seed: int = 0) -> nn.Module:
    """KW at 1/2x: stem 3x3 (bias) + BN, depthwise 3x3 + BN, 1x1 + BN, strided 1x1 + BN, 3x3 on the 6x6 map + BN
    (its kernels outweigh its output: the scale goes onto the output; the others' into their kernels), and a
    Linear + BatchNorm1d head (the output too)."""
    torch.manual_seed(seed)
    convs = [nn.Conv2d(3, 16, 3, padding=1, bias=True), nn.Conv2d(16, 16, 3, padding=1, groups=16),
             nn.Conv2d(16, 32, 1, bias=False), nn.Conv2d(32, 32, 1, stride=2, bias=False),
             nn.Conv2d(32, 32, 3, padding=1, bias=False)]
    kw = convert_convs(convs[:1], 0.5) + convert_convs(convs[1:2], 0.5) + convert_convs(convs[2:], 0.5)
    head = convert_convs([nn.Linear(32, 10)], 1.0)
    net = nn.Sequential(kw[0], nn.BatchNorm2d(16), nn.ReLU6(inplace=True), kw[1], nn.BatchNorm2d(16), nn.ReLU(),
                        kw[2], nn.BatchNorm2d(32), kw[3], nn.BatchNorm2d(32), kw[4], nn.BatchNorm2d(32),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), head[0], nn.BatchNorm1d(10))
    randomize_bn(net, seed)
    lkfx.set_temperature(net, 0.3)
    return net.eval()


def fold(model: nn.Module, **kw):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = lkfx.transform(model, ["fold_bn"], return_report=True, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the input model changed"
    return out, report["fold_bn"]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("batch", [1, 3])
def test_bn_after_kw_convs_becomes_their_output_affine(channels_last, batch):
    model = kw_net()
    out, pr = fold(model, example_inputs=(torch.randn(2, 3, 12, 12),))
    assert (pr.matched, pr.rewritten, pr.skipped) == (6, 6, [])
    assert fx_bn_nodes(out) == []  # (each KWConv's attention keeps its own BatchNorm1d)
    assert all(m.scale is not None and m.bias is not None for m in out.modules() if isinstance(m, KWConv))
    x = torch.randn(batch, 3, 12, 12)
    if channels_last:
        model, out = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (model, out))
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # the epilogue in place
        ref = model(x)
        assert max_rel_error([ref.numpy()], [out(x).numpy()]) <= 1e-6
    y = out(x)  # with autograd: out of place, gradients reach the warehouse through the folded scale
    assert max_rel_error([ref.numpy()], [y.detach().numpy()]) <= 1e-6
    y.sum().backward()
    assert all(m.warehouse.cells.grad is not None for m in out.modules()
               if isinstance(m, KWConv) and hasattr(m, "warehouse"))


@pytest.mark.parametrize("index,channels", [(6, 16), (10, 32)])  # the scale in the kernels / on the output
def test_fold_affine_composes_and_keeps_the_state_dict_loadable(index, channels):
    model = kw_net()
    conv = model[index]
    x = torch.randn(2, channels, 6, 6)
    s1, t1, s2, t2 = (torch.rand(32, dtype=torch.float64).view(1, -1, 1, 1) + 0.5 for _ in range(4))
    with torch.no_grad():
        y = conv(x)
        conv.fold_affine(s1, t1)
        conv.fold_affine(s2, t2)
        expected = ((y * s1.float() + t1.float()) * s2.float() + t2.float()).numpy()
        assert max_rel_error([expected], [conv(x).numpy()]) <= 1e-6
    state = model.state_dict()
    assert f"{index}.scale" in state and f"{index}.bias" in state
    again = kw_net(seed=1)
    again[index].fold_affine(torch.ones(32), torch.zeros(32))
    again.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(again(torch.ones(1, 3, 8, 8)), model(torch.ones(1, 3, 8, 8)))


def test_folded_kw_model_exports_to_onnx(tmp_path):
    model = kw_net()
    out, _ = fold(model, example_inputs=(torch.randn(2, 3, 12, 12),))
    path = tmp_path / "kw.onnx"
    torch.onnx.export(out, (torch.randn(2, 3, 12, 12),), path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        ref = model(x).numpy()
    assert max_rel_error([ref], sess.run(None, {sess.get_inputs()[0].name: x.numpy()})) <= TOL


def test_mobilenet_v2_kw_folds_every_batchnorm():
    torch.manual_seed(0)
    static = randomize_bn(torchvision.models.mobilenet_v2()).eval()
    kw = lkfx.transform(static, ["kernel_warehouse"], example_inputs=(torch.randn(2, 3, 32, 32),)).eval()
    lkfx.set_temperature(kw, 1.0)  # the static model's kernels: activations far from 0
    out, pr = fold(kw)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in static.modules())
    assert pr.rewritten == bns and fx_bn_nodes(out) == []
    assert_same_outputs(kw, out, (torch.randn(3, 3, 32, 32),))


class ReadTwice(nn.Module):
    """The KWConv's output is read by its BN and by the residual add (or the module is called twice)."""

    def __init__(self, call_twice: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = convert_convs([nn.Conv2d(8, 8, 3, padding=1)], 1.0)[0]
        self.bn = nn.BatchNorm2d(8)
        self.call_twice = call_twice

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + (self.conv(2 * x) if self.call_twice else y)


@pytest.mark.parametrize("call_twice,reason", [(False, "the conv output is also used by add"),
                                               (True, "the KWConv module is called 2 times")])
def test_shared_output_or_module_is_refused(call_twice, reason):
    model = randomize_bn(ReadTwice(call_twice)).eval()
    out, pr = fold(model)
    assert pr.rewritten == 0 and all(reason in r for r in reasons(pr)), reasons(pr)
    assert out.conv.scale is None
    assert_same_outputs(model, out, (torch.randn(2, 8, 6, 6),))


def test_training_mode_bn_is_refused():
    model = kw_net().train()
    _, pr = fold(model)
    assert pr.rewritten == 0 and all("training mode" in r for r in reasons(pr)), reasons(pr)


class InvertedResidual(nn.Module):
    """expand 1x1 -> ReLU6 -> depthwise 3x3 (multiplier 2, stride `stride`) -> ReLU6 -> project 1x1, + skip when
    shapes allow; the project's output goes to the add or the graph output (so it must be handed on
    channels-last)."""

    def __init__(self, stride: int):
        super().__init__()
        torch.manual_seed(stride)
        convs = [nn.Conv2d(8, 24, 1, bias=False), nn.Conv2d(24, 48, 3, stride, 1, groups=24, bias=True),
                 nn.Conv2d(48, 8, 1, bias=True)]
        self.expand, self.depthwise, self.project = convert_convs(convs, 1.0)
        self.act1, self.act2 = nn.ReLU6(inplace=True), nn.ReLU6()
        self.stride = stride

    def forward(self, x):
        y = self.project(self.act2(self.depthwise(self.act1(self.expand(x)))))
        return x + y if self.stride == 1 else y


@pytest.mark.parametrize("stride", [1, 2])
def test_kw_chain_hands_on_batch_interleaved_maps(stride):
    """expand and depthwise pass their outputs on batch-interleaved (memory (H, W, B, C)) without autograd; the
    depthwise conv runs the batch as one conv; only the layout changes, never the values."""
    model = InvertedResidual(stride).eval()
    lkfx.set_temperature(model, 0.3)
    gm = trace(copy.deepcopy(model), (KWConv,))
    assert mark_interleaved(gm) == 2
    assert (gm.expand.interleave_output, gm.depthwise.interleave_output, gm.project.interleave_output) == \
        (True, True, False)
    x = torch.randn(3, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    seen = {}
    hooks = [getattr(gm, name).register_forward_hook(lambda m, a, y, name=name: seen.__setitem__(name, y.stride()))
             for name in ("expand", "depthwise", "project")]
    with torch.no_grad():
        ref, y = model(x), gm(x)
    for h in hooks:
        h.remove()
    assert max_rel_error([ref.numpy()], [y.numpy()]) <= 1e-6
    size = 10 // stride
    assert seen["expand"] == (24, 1, 10 * 3 * 24, 3 * 24)  # (H, W, B, C) in memory
    assert seen["depthwise"] == (48, 1, size * 3 * 48, 3 * 48)
    assert y.is_contiguous(memory_format=torch.channels_last)
    y = gm(x)  # with autograd: plain channels-last maps, same values
    assert max_rel_error([ref.numpy()], [y.detach().numpy()]) <= 1e-6
    with torch.no_grad():  # NCHW input and batch 1: their own paths, same values
        for v in (x.contiguous(), x[:1]):
            assert max_rel_error([model(v).numpy()], [gm(v).numpy()]) <= 1e-6


def test_batchnorm_between_kw_convs_keeps_channels_last_until_folded():
    torch.manual_seed(0)
    static = randomize_bn(torchvision.models.mobilenet_v2()).eval()
    kw = lkfx.transform(static, ["kernel_warehouse"], example_inputs=(torch.randn(2, 3, 32, 32),)).eval()
    convs = [m for m in kw.modules() if isinstance(m, KWConv)]
    assert not any(m.interleave_output for m in convs)  # BatchNorm is ~10x slower on interleaved maps
    out = lkfx.transform(kw, ["fold_bn"])
    marked = {n for n, m in out.named_modules() if isinstance(m, KWConv) and m.interleave_output}
    # the expand and depthwise convs of the blocks (features.14's project conv stays static, as in the official
    # model: its depthwise conv hands on channels-last), and projects feeding the next block's expand only
    assert len(marked) > 20 and "features.14.conv.1.0" not in marked and "features.2.conv.1.0" in marked
    lkfx.set_temperature(kw, 1.0)
    lkfx.set_temperature(out, 1.0)
    x = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    kw_cl, out_cl = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (kw, out))
    assert_same_outputs(kw_cl, out_cl, (x,))
