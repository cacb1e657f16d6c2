"""reparam_large_kernel (FX): which depthwise convs are swapped and why others are not, and that the swap with
`preserve` init keeps the eval-mode model exact (fp32 max relative error <= 1e-5); merge_reparam then gives one
large depthwise conv per block, still exact."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, randomize_bn, reasons

import lkfx
from lkfx.errors import LkfxError
from lkfx.modules.replk import ReparamLargeKernelConv


class Stage(nn.Module):
    def __init__(self, c: int, k: int = 7, stride: int = 1, **conv):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, stride, conv.pop("padding", k // 2), groups=c, **conv)
        self.pw = nn.Conv2d(c, c, 1)
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        return x + self.pw(self.norm(self.dw(x)).relu()) if self.dw.stride == (1, 1) else self.pw(self.dw(x))


class Net(nn.Module):
    """A small ConvNeXt-like net: two stages of depthwise 7x7 blocks, a stride-2 depthwise downsample, one
    functional depthwise conv and a 3x3 depthwise conv that the default min_kernel leaves alone."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.s0 = nn.Sequential(Stage(c), Stage(c))
        self.down = Stage(c, 5, stride=2)
        self.s1 = nn.Sequential(Stage(c), Stage(c, 3))
        self.fw = nn.Parameter(torch.randn(c, 1, 5, 5) * 0.2)

    def forward(self, x):
        y = self.s1(self.down(self.s0(self.stem(x))))
        return F.conv2d(y, self.fw, padding=2, groups=8)


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(Net(), seed).eval()


def swap(model, x=None, **options):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    passes = [("reparam_large_kernel", options)]
    out, report = lkfx.transform(model, passes, example_inputs=None if x is None else (x,), return_report=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the caller's model changed"
    return out, report["reparam_large_kernel"]


def blocks(gm) -> dict[str, ReparamLargeKernelConv]:
    return {n: m for n, m in gm.named_modules() if isinstance(m, ReparamLargeKernelConv)}


X = torch.randn(2, 3, 16, 16)


def test_swap_is_exact_and_reports_every_depthwise_conv():
    model = build()
    out, pr = swap(model)
    assert pr.matched == 6 and pr.rewritten == 5
    assert sorted(blocks(out)) == ["conv2d_replk", "down.dw", "s0.0.dw", "s0.1.dw", "s1.0.dw"]
    assert {b.kernel_size for b in blocks(out).values()} == {31}
    assert blocks(out)["down.dw"].stride == 2
    assert reasons(pr) == ["kernel 3x3 is below min_kernel=5"]
    assert "s0.0.dw: 7x7 -> 31x31 + [5x5] (preserve init)" in pr.notes
    assert_same_outputs(model, out, (X,))


def test_then_merge_is_exact():
    model = build()
    swapped, _ = swap(model)
    deployed, report = lkfx.transform(swapped, ["merge_reparam"], example_inputs=(X,), check=True,
                                      return_report=True)
    assert report["merge_reparam"].rewritten == 5 and not blocks(deployed)
    dws = [m for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.groups == 8]
    assert sorted(m.kernel_size[0] for m in dws) == [3, 31, 31, 31, 31, 31]
    assert_same_outputs(model, deployed, (X,))


def test_per_stage_kernels_need_example_inputs():
    """Stages are the feature-map sizes, largest first: 16x16 (s0), 8x8 (the stride-2 conv's output, s1, fw)."""
    model = build()
    out, pr = swap(model, X, kernel_size=[13, 9], min_kernel=3)
    sizes = {n: b.kernel_size for n, b in blocks(out).items()}
    assert sizes == {"s0.0.dw": 13, "s0.1.dw": 13, "down.dw": 9, "s1.0.dw": 9, "s1.1.dw": 9, "conv2d_replk": 9}
    assert "s1.1.dw: 3x3 -> 9x9 + [5x5] (preserve init, stage 1)" in pr.notes
    assert_same_outputs(model, out, (X,))
    with pytest.raises(LkfxError, match="needs example_inputs"):
        swap(model, kernel_size=[13, 9])
    with pytest.raises(LkfxError, match="lists 3 stages but the selected depthwise convs work on 2"):
        swap(model, X, kernel_size=[13, 9, 7])


@pytest.mark.parametrize("options,swapped,reason", [
    ({"name": r"^s0\."}, 2, "name does not match"),
    ({"kernel_size": 7}, 2, "is not smaller than the target 7x7"),
    ({"min_kernel": 7}, 3, "below min_kernel=7"),
])
def test_selection(options, swapped, reason):
    model = build()
    out, pr = swap(model, **options)
    assert pr.rewritten == swapped and any(reason in r for r in reasons(pr)), reasons(pr)
    assert_same_outputs(model, out, (X,))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("conv,reason", [
    ({"k": 6, "padding": "same"}, "even kernel"),
    ({"k": 5, "padding": 0}, "is not 'same'"),
    ({"k": 5, "stride": 3}, "stride (3, 3)"),
    ({"k": 5, "padding_mode": "reflect"}, "padding mode 'reflect'"),
])
def test_refusals(conv, reason):
    k = conv.pop("k")
    conv.setdefault("padding", k // 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, k, groups=8, **conv)).eval()
    out, pr = swap(model)
    assert pr.rewritten == 0 and reason in reasons(pr)[0], reasons(pr)
    assert_same_outputs(model, out, (X,))


def test_computed_groups_is_refused():
    class Computed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 7, 7))

        def forward(self, x):
            return F.conv2d(x, self.w, padding=3, groups=x.shape[1])

    out, pr = swap(Computed().eval())
    assert pr.rewritten == 0 and reasons(pr) == ["its groups computed in the graph"]


def test_shared_weight_is_refused():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(4, 4, 7, padding=3, groups=4)

        def forward(self, x):
            return self.dw(self.dw(x))

    out, pr = swap(Twice().eval())
    assert pr.rewritten == 0 and "weight shared" in reasons(pr)[0]


def test_random_init_swaps_but_is_not_exact():
    model = build()
    out, pr = swap(model, init="random")
    assert pr.rewritten == 5 and "(random init)" in pr.notes[0]
    assert all(float(b.large.bn.weight.detach().min()) == 1.0 for b in blocks(out).values())


def test_bad_options():
    for options, match in (({"kernel_size": 8}, "odd int"), ({"kernel_size": [31, "x"]}, "odd int"),
                           ({"init": "zeros"}, "'preserve' or 'random'"), ({"small_kernels": (4,)}, "odd"),
                           ({"min_kernel": "5"}, "must be a number")):
        with pytest.raises(LkfxError, match=match):
            lkfx.transform(build(), [("reparam_large_kernel", options)])


def test_existing_blocks_are_not_swapped_again():
    model = build()
    once, _ = swap(model)
    twice, pr = swap(once)
    assert pr.rewritten == 0 and len(blocks(twice)) == 5


def test_timm_convnext():
    """A real timm ConvNeXt (random weights, layer scales set to 1 so the blocks matter): swap its 7x7 depthwise
    convs with RepLKNet's per-stage kernels 31/29/27/13 (+ 5x5): exact in eval mode, and in training mode on the
    batch whose statistics initialised the BNs (ConvNeXt has no BatchNorm upstream to change them); then merge,
    still exact."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    x = torch.randn(2, 3, 64, 64)
    swapped, report = lkfx.transform(model, [("reparam_large_kernel", {"kernel_size": [31, 29, 27, 13]})],
                                     example_inputs=(x,), check=True, return_report=True)
    assert report["reparam_large_kernel"].rewritten == 12 and report.check["max_rel_error"] <= 1e-5
    assert_same_outputs(copy.deepcopy(model).train(), copy.deepcopy(swapped).train(), (x,))  # BN stats move
    deployed, report = lkfx.transform(swapped, ["merge_reparam"], example_inputs=(x,), check=True,
                                      return_report=True)
    assert report["merge_reparam"].rewritten == 12 and not blocks(deployed)
    sizes = sorted({m.kernel_size[0] for m in deployed.modules() if isinstance(m, nn.Conv2d) and m.groups > 1})
    assert sizes == [13, 27, 29, 31]
    assert_same_outputs(model, deployed, (x,))
