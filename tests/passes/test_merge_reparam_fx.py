"""merge_reparam on torch.fx: each case proves the merge fires (one conv left, no BatchNorm) or refuses with its
reason, and that the result computes the same outputs (fp32 max relative error <= 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, fx_bn_nodes, randomize_bn, reasons
from torch.fx.experimental.proxy_tensor import make_fx

import lkfx
from lkfx.modules.replk import ReparamLargeKernelConv

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class Branches(nn.Module):
    """sum_i [BN_i](conv_i(x)) [+ x | + BN(x)] [-> BN]: the train form of RepVGG / RepLK / RepViT blocks."""

    def __init__(self, cin: int, cout: int, convs: list[dict], *, nd: int = 2, bn: bool = True,
                 identity: str | None = None, bn_after: bool = False):
        super().__init__()
        self.convs = nn.ModuleList(CONV[nd](cin, cout, **kw) for kw in convs)
        self.bns = nn.ModuleList(BN[nd](cout) if bn else nn.Identity() for _ in convs)
        self.identity = identity
        self.id_bn = BN[nd](cout) if identity == "bn" else None
        self.bn_after = BN[nd](cout) if bn_after else None

    def forward(self, x):
        out = self.bns[0](self.convs[0](x))
        for conv, bn in zip(self.convs[1:], self.bns[1:], strict=True):
            out = out + bn(conv(x))
        if self.identity == "plain":
            out = out + x
        elif self.identity == "bn":
            out = out + self.id_bn(x)
        return self.bn_after(out) if self.bn_after is not None else out


def build(module: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return randomize_bn(module, seed).eval()


def merge(model, x, passes=("merge_reparam",)):
    """transform with inplace=False; asserts the caller's module is untouched. Returns (result, report)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = lkfx.transform(model, list(passes), example_inputs=(x,), return_report=True)
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    return out, report["merge_reparam"]


def convs_of(gm) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def check_merged(model, x, n: int = 1, convs: int = 1):
    out, pr = merge(model, x)
    assert (pr.matched, pr.rewritten, pr.skipped) == (n, n, []), (pr.skipped, pr.notes)
    assert fx_bn_nodes(out) == [] and len(convs_of(out)) == convs
    assert_same_outputs(model, out, (x,))
    return out, pr


def check_refused(model, x, reason: str):
    out, pr = merge(model, x)
    assert pr.rewritten == 0 and pr.skipped, pr.notes
    assert all(reason in r for r in reasons(pr)), reasons(pr)
    assert_same_outputs(model, out, (x,))
    return out, pr


# --- the generic rule -----------------------------------------------------------------------------------------
def test_small_plus_large():
    model = build(Branches(4, 6, [{"kernel_size": 7, "padding": 3}, {"kernel_size": 3, "padding": 1, "bias": False},
                                  {"kernel_size": 1}]))
    out, pr = check_merged(model, torch.randn(2, 4, 12, 11))
    assert convs_of(out)[0].kernel_size == (7, 7) and convs_of(out)[0].padding == (3, 3)
    assert pr.notes == ["merged convs.0, convs.1, convs.2 into convs.reparam_conv (7x7)"]


def test_depthwise_large_kernel_with_dilated_branches():
    """UniRepLKNet K = 13: kernels 5, 7, 3, 3, 3 with dilations 1, 2, 3, 4, 5, all depthwise."""
    specs = [{"kernel_size": 13, "padding": 6}] + [
        {"kernel_size": k, "dilation": d, "padding": d * (k - 1) // 2} for k, d in
        ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))]
    model = build(Branches(8, 8, [dict(s, groups=8, bias=False) for s in specs]))
    out, _ = check_merged(model, torch.randn(2, 8, 16, 16))
    conv = convs_of(out)[0]
    assert conv.kernel_size == (13, 13) and conv.dilation == (1, 1) and conv.groups == 8


@pytest.mark.parametrize("identity", ["plain", "bn"])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_identity_branch(identity, groups):
    model = build(Branches(4, 4, [{"kernel_size": 3, "padding": 1, "groups": groups},
                                  {"kernel_size": 1, "groups": groups}], identity=identity))
    check_merged(model, torch.randn(2, 4, 9, 9))


def test_bn_after_the_sum():
    """RepViT's RepVggDw: BN(conv_bn(x) + conv(x) + x), the BN folded into the merged conv."""
    model = build(Branches(6, 6, [{"kernel_size": 3, "padding": 1, "groups": 6, "bias": False},
                                  {"kernel_size": 1, "groups": 6}], identity="plain", bn_after=True))
    model.bns[1] = nn.Identity()
    _, pr = check_merged(build(model), torch.randn(2, 6, 8, 8))
    assert "and bn_after" in pr.notes[0]


def test_bn_before_conv_branch_form_refuses_pre_normalised_branch_only():
    """conv -> BN branches are the usual 'BN before the add' form; a BN *feeding* a branch conv is not a branch
    of x: nothing merges with it, and its conv still merges with the other branches of the BN's output."""

    class PreBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.bn(x)
            return self.a(y) + self.b(y)

    model = build(PreBN())
    out, pr = merge(model, torch.randn(2, 4, 8, 8))
    assert pr.rewritten == 1 and len(convs_of(out)) == 1 and len(fx_bn_nodes(out)) == 1
    assert_same_outputs(model, out, (torch.randn(2, 4, 8, 8),))


def test_stride_2():
    model = build(Branches(4, 8, [{"kernel_size": 3, "padding": 1, "stride": 2}, {"kernel_size": 1, "stride": 2}]))
    for hw in (8, 9):
        check_merged(model, torch.randn(2, 4, hw, hw))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_even_kernels_with_same_padding():
    """torch pads even 'same' kernels asymmetrically (left = total // 2): 2x2 + 4x4 + 3x3 -> a 4x4 'same' conv."""
    model = build(Branches(4, 4, [{"kernel_size": k, "padding": "same"} for k in (2, 4, 3)]))
    out, _ = check_merged(model, torch.randn(2, 4, 7, 6))
    assert convs_of(out)[0].kernel_size == (4, 4) and convs_of(out)[0].padding == "same"


def test_kernels_larger_than_the_feature_map():
    model = build(Branches(4, 4, [{"kernel_size": 11, "padding": 5}, {"kernel_size": 7, "padding": 3}], bn=True))
    check_merged(model, torch.randn(2, 4, 5, 4))


@pytest.mark.parametrize("nd", [1, 3])
def test_other_ranks(nd):
    model = build(Branches(3, 5, [{"kernel_size": 5, "padding": 2}, {"kernel_size": 3, "padding": 2, "dilation": 2},
                                  {"kernel_size": 1}], nd=nd))
    check_merged(model, torch.randn(2, 3, *((13,) if nd == 1 else (6, 5, 7))))


class LinearCombination(nn.Module):
    """FastViT's RepMixer form: x + layer_scale * (mixer(x) - norm(x)), plus a scalar and a negated branch."""

    def __init__(self, c: int = 6):
        super().__init__()
        self.mixer, self.mixer_bn = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c)
        self.small = nn.Conv2d(c, c, 1, groups=c)
        self.norm = nn.BatchNorm2d(c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x):
        y = x + self.layer_scale * (self.mixer_bn(self.mixer(x)) - self.norm(x))
        return 0.5 + y - self.small(x)


def test_sub_neg_mul_by_per_channel_constant_and_scalar():
    model = build(LinearCombination())
    out, pr = check_merged(model, torch.randn(2, 6, 8, 8))
    assert [n.op for n in out.graph.nodes] == ["placeholder", "call_module", "output"]


def test_zero_constant_term_is_bias():
    """timm's MobileOneBlock without identity adds the int 0."""

    class PlusZero(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x) + 0

    check_merged(build(PlusZero()), torch.randn(2, 3, 6, 6))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 1, 5, 5))
        self.w2 = nn.Parameter(torch.randn(6, 1, 3, 3))
        self.b2 = nn.Parameter(torch.randn(6))

    def forward(self, x):
        return F.conv2d(x, self.w1, padding=2, groups=6) + F.conv2d(x, self.w2, self.b2, padding=2, dilation=2,
                                                                    groups=6)


def test_functional_convs():
    model = build(Functional())
    out, _ = check_merged(model, torch.randn(2, 6, 9, 9))
    assert convs_of(out)[0].kernel_size == (5, 5)


def test_aten_graph():
    model = build(Branches(4, 4, [{"kernel_size": 3, "padding": 1}, {"kernel_size": 1}], bn=False,
                           identity="plain"))
    x = torch.randn(2, 4, 8, 8)
    gm = make_fx(model)(x)
    out, pr = merge(gm, x)
    convs = [n for n in out.graph.nodes if n.op == "call_function" and "convolution" in str(n.target)]
    assert pr.rewritten == 1 and len(convs) == 1
    assert_same_outputs(model, out, (x,))


def test_merged_group_plus_other_terms():
    """Two groups (one per input) and a term that is no branch: each group merges, the rest is added back."""

    class TwoGroups(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
            self.c, self.d = nn.Conv2d(4, 4, 5, padding=2), nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            y = x.relu()
            return self.a(x) - self.c(y) + self.b(x) * 2.0 + y.sigmoid() - 3 * self.d(y)

    model = build(TwoGroups())
    check_merged(model, torch.randn(2, 4, 8, 8), n=2, convs=2)


# --- refusals -------------------------------------------------------------------------------------------------
def test_refuses_different_strides():
    model = build(Branches(4, 4, [{"kernel_size": 1, "stride": 2}, {"kernel_size": 5}]))
    check_refused(model, torch.randn(2, 4, 8, 8), "differ in stride")


def test_refuses_padding_mode():
    model = build(Branches(4, 4, [{"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}, {"kernel_size": 1}]))
    check_refused(model, torch.randn(2, 4, 8, 8), "pads with 'reflect'")


def test_refuses_different_groups():
    model = build(Branches(4, 4, [{"kernel_size": 3, "padding": 1, "groups": 2}, {"kernel_size": 1}]))
    check_refused(model, torch.randn(2, 4, 8, 8), "differ in groups")


def test_refuses_dilation_that_changes_the_output_size():
    """On 9x9 both give 4x4, but a 3x3 dilation-2 kernel with padding 1 at stride 2 loses one more row than the
    2x2 kernel for other sizes: no single conv equals the sum for every input size."""
    model = build(Branches(4, 4, [{"kernel_size": 3, "dilation": 2, "padding": 1, "stride": 2},
                                  {"kernel_size": 2, "stride": 2}]))
    check_refused(model, torch.randn(2, 4, 9, 9), "different output sizes")


def test_refuses_training_mode_bn():
    model = build(Branches(4, 4, [{"kernel_size": 3, "padding": 1}, {"kernel_size": 1}])).train()
    out, pr = lkfx.transform(model, ["merge_reparam"], return_report=True)
    assert pr["merge_reparam"].rewritten == 0
    assert "training mode" in reasons(pr["merge_reparam"])[0]
    assert len(fx_bn_nodes(out)) == 2


def test_refuses_branch_output_used_elsewhere():
    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a = self.a(x)
            return a + self.b(x), a.relu()

    check_refused(build(Tapped()), torch.randn(2, 4, 8, 8), "is read by 2 nodes")


def test_untouched_without_a_conv_group():
    """Residual adds of unrelated tensors are not candidates: nothing matched, nothing refused."""
    model = build(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()))

    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x):
            y = self.body(x)
            return y + y.relu()

    out, pr = merge(build(Res()), torch.randn(2, 3, 8, 8))
    assert (pr.matched, pr.rewritten, pr.skipped) == (0, 0, [])


# --- modules' own deploy methods ----------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, block: nn.Module, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.block = block
        self.head = nn.Conv2d(c, 4, 1)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).relu())


def test_own_block_reparameterize():
    model = build(Net(ReparamLargeKernelConv(8, 13, small_kernels=(5, (3, 2)))))
    out, pr = check_merged(model, torch.randn(2, 3, 10, 10), convs=3)
    assert pr.notes == ["block (ReparamLargeKernelConv): merged by its own reparameterize()"]
    assert isinstance(out.get_submodule("block.reparam_conv"), nn.Conv2d)
    assert isinstance(model.block.large, nn.Sequential), "the caller's block was converted"


class Fusable(nn.Module):
    """A `fuse()` that returns the replacement (timm's RepViT style)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(self.conv(x))

    def fuse(self):
        s = self.bn.weight / (self.bn.running_var + self.bn.eps).sqrt()
        conv = nn.Conv2d(self.conv.in_channels, self.conv.out_channels, 3, padding=1)
        conv.weight.data.copy_(self.conv.weight * s[:, None, None, None])
        conv.bias.data.copy_(self.bn.bias - self.bn.running_mean * s)
        return conv


def test_fuse_returns_the_replacement():
    model = build(Net(Fusable()))
    out, pr = check_merged(model, torch.randn(2, 3, 8, 8), convs=3)
    assert pr.notes == ["block (Fusable): merged by its own fuse()"]


class Broken(Branches):
    def reparameterize(self):
        raise RuntimeError("no deploy form today")


def test_failing_method_is_refused_and_the_graph_rule_merges_instead():
    block = Broken(8, 8, [{"kernel_size": 3, "padding": 1}, {"kernel_size": 1}], identity="bn")
    model = build(Net(block))
    out, pr = merge(model, torch.randn(2, 3, 8, 8))
    assert pr.matched == 2 and pr.rewritten == 1
    assert reasons(pr) == ["module reparameterize(): its reparameterize() raised RuntimeError: no deploy form today"]
    assert fx_bn_nodes(out) == [] and len(convs_of(out)) == 3
    assert_same_outputs(model, out, (torch.randn(2, 3, 8, 8),))


def test_training_mode_block_is_refused():
    model = build(Net(ReparamLargeKernelConv(8, 7)))
    model.block.train()
    out, pr = merge(model, torch.randn(2, 3, 8, 8))
    assert "training mode" in reasons(pr)[0] and pr.rewritten == 0


def test_graph_module_input_uses_the_generic_rule():
    """A model traced by the user has no block left to call: the generic rule merges it the same way."""
    model = build(Net(ReparamLargeKernelConv(8, 13, dilated=True)))
    gm = fx.symbolic_trace(copy.deepcopy(model))
    out, pr = merge(gm, torch.randn(2, 3, 16, 16))
    assert pr.rewritten == 1 and pr.notes[0].startswith("merged block.large.conv, block.small.0.conv")
    assert fx_bn_nodes(out) == [] and len(convs_of(out)) == 3
    assert_same_outputs(model, out, (torch.randn(2, 3, 16, 16),))


def test_second_run_changes_nothing():
    model = build(Net(ReparamLargeKernelConv(8, 7)))
    out, _ = merge(model, torch.randn(2, 3, 8, 8))
    _, again = merge(out, torch.randn(2, 3, 8, 8))
    assert (again.matched, again.rewritten) == (0, 0)


def test_identity_that_is_itself_a_conv_output():
    """The shared input of the branches may come from a conv: it is an identity branch, not a branch of its own."""

    class AfterConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Conv2d(3, 4, 3, padding=1)
            self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.first(x)
            return self.a(y) + self.b(y) + y

    out, pr = check_merged(build(AfterConv()), torch.randn(2, 3, 8, 8), convs=2)
    assert pr.notes == ["merged a, b, identity first into reparam_conv (3x3)"]


def test_block_called_twice_is_converted_once_and_inlined_at_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ReparamLargeKernelConv(4, 9)

        def forward(self, x):
            return self.block(self.block(x).relu())

    model = build(Twice())
    out, pr = check_merged(model, torch.randn(2, 4, 10, 10))
    assert [n.target for n in out.graph.nodes if n.op == "call_module"] == ["block.reparam_conv"] * 2


def test_already_deployed_block_is_not_counted():
    block = build(ReparamLargeKernelConv(8, 7))
    block.reparameterize()
    out, pr = merge(build(Net(block)), torch.randn(2, 3, 8, 8))
    assert (pr.matched, pr.rewritten, pr.skipped) == (0, 0, [])
    assert isinstance(out.get_submodule("block.reparam_conv"), nn.Conv2d)


def test_a_submodule_named_fuse_is_no_deploy_method():
    class Fusion(nn.Module):
        def __init__(self):
            super().__init__()
            self.fuse = nn.Conv2d(8, 8, 1)

        def forward(self, x):
            return self.fuse(x)

    out, pr = merge(build(Net(Fusion())), torch.randn(2, 3, 8, 8))
    assert (pr.matched, pr.skipped) == (0, [])
