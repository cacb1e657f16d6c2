"""fold_bn on the torch.fx frontend: each case proves the fold fires (counts, BN gone) or refuses with its
reason, and that the folded module computes the same outputs (fp32 max relative error <= 1e-5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, fx_bn_nodes, fx_getitems, randomize_bn, reasons
from torch.fx.experimental.proxy_tensor import make_fx

import lkfx
from lkfx.passes.fold_bn import BEFORE_OFF_REASON, ZERO_PAD_REASON

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SIZE = {1: (19,), 2: (11, 10), 3: (7, 6, 8)}


def fold(model: nn.Module, example_inputs=None, **options):
    """fold_bn with inplace=False; asserts the input module's state is untouched. Returns (result, report)."""
    if not isinstance(model, torch.fx.GraphModule):  # torch.export's modules refuse .eval()
        model.eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    passes = [("fold_bn", options)] if options else ["fold_bn"]
    out, report = lkfx.transform(model, passes, example_inputs=example_inputs, return_report=True)
    after = model.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state), "inplace=False changed the input module"
    return out, report["fold_bn"]


def check_folded(model, out, pr, inputs, n: int = 1) -> None:
    assert (pr.matched, pr.rewritten, pr.skipped, pr.modified) == (n, n, [], True)
    assert fx_bn_nodes(out) == []
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in out.modules())
    assert_same_outputs(model, out, inputs)


def check_refused(model, out, pr, inputs, reason: str, n_bn: int = 1) -> None:
    assert pr.rewritten == 0 and not pr.modified
    assert pr.skipped, "expected a refusal"
    assert all(reason in r for r in reasons(pr)), reasons(pr)
    assert len(fx_bn_nodes(out)) == n_bn
    assert_same_outputs(model, out, inputs)


def seq(*layers: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(nn.Sequential(*layers), seed).eval()


# --- conv -> BN ---------------------------------------------------------------------------------------------
CONV_CASES = [
    # cin, cout, kwargs
    (4, 6, {}),
    (4, 6, {"bias": False}),
    (4, 6, {"stride": 2, "padding": 1}),
    (4, 6, {"dilation": 2, "padding": 2}),
    (4, 6, {"padding": "same"}),
    (6, 6, {"groups": 6}),  # depthwise
    (6, 12, {"groups": 3, "stride": 2, "bias": False}),  # grouped
    (4, 6, {"padding": 1, "padding_mode": "reflect"}),
]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cin,cout,kw", CONV_CASES)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn(nd, cin, cout, kw, affine):
    model = seq(CONV[nd](cin, cout, 3, **kw), BN[nd](cout, affine=affine), nn.ReLU())
    x = torch.randn(2, cin, *SIZE[nd])
    out, pr = fold(model)
    check_folded(model, out, pr, (x,))


@pytest.mark.parametrize("kw", [
    {},
    {"bias": False},
    {"stride": 2, "output_padding": 1},
    {"stride": 2, "padding": 1, "output_padding": 1, "dilation": 2},
    {"groups": 2},
    {"groups": 3, "stride": 2, "output_padding": 1, "bias": False},
    {"groups": 6, "stride": 3, "padding": 1, "output_padding": 2},
])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose_bn(nd, kw):
    cout = 12 if kw.get("groups", 1) == 6 else 9 if kw.get("groups", 1) == 3 else 8
    model = seq(CONV_T[nd](6, cout, 3, **kw), BN[nd](cout))
    x = torch.randn(2, 6, *SIZE[nd])
    out, pr = fold(model)
    check_folded(model, out, pr, (x,))


# --- Linear -> BatchNorm1d ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_linear_bn_with_example_inputs(bias):
    model = seq(nn.Linear(10, 7, bias=bias), nn.BatchNorm1d(7))
    x = torch.randn(5, 10)
    out, pr = fold(model, example_inputs=(x,))
    check_folded(model, out, pr, (x,))


def test_linear_bn_without_example_inputs_is_refused():
    model = seq(nn.Linear(10, 7), nn.BatchNorm1d(7))
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(5, 10),), "pass example_inputs")


def test_bn_linear_without_example_inputs_is_refused():
    model = seq(nn.BatchNorm1d(10), nn.Linear(10, 7))
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(5, 10),), "pass example_inputs")


def test_linear_bn_on_3d_input_is_refused():
    # BatchNorm1d on (N, C, L) normalises dim 1, the Linear mixes dim 2: not a per-output-channel affine.
    model = seq(nn.Linear(8, 8), nn.BatchNorm1d(8))
    x = torch.randn(3, 8, 8)
    out, pr = fold(model, example_inputs=(x,))
    check_refused(model, out, pr, (x,), "the Linear's tensor is 3-D")


# --- BN -> conv ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [
    {},
    {"stride": 2, "dilation": 2},
    {"groups": 2},
    {"groups": 4, "bias": False},
    {"padding": "valid"},
    {"padding": 1, "padding_mode": "reflect"},
    {"padding": 1, "padding_mode": "replicate"},
    {"padding": 2, "padding_mode": "circular", "groups": 2},
])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_bn_conv(nd, kw):
    model = seq(BN[nd](4), CONV[nd](4, 6 if kw.get("groups", 1) != 4 else 8, 3, **kw))
    x = torch.randn(2, 4, *SIZE[nd])
    out, pr = fold(model)
    check_folded(model, out, pr, (x,))


@pytest.mark.parametrize("kw", [{"padding": 1}, {"padding": "same"}, {"padding": (0, 1)}])
def test_bn_zero_padded_conv_is_refused(kw):
    model = seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3, **kw))
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(2, 4, 9, 9),), ZERO_PAD_REASON)


def test_bn_linear_with_example_inputs():
    model = seq(nn.BatchNorm1d(10), nn.Linear(10, 7))
    x = torch.randn(5, 10)
    out, pr = fold(model, example_inputs=(x,))
    check_folded(model, out, pr, (x,))


def test_before_option_off_leaves_bn_conv():
    model = seq(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3))
    out, pr = fold(model, before=False)
    assert (pr.matched, pr.rewritten) == (1, 0)
    assert reasons(pr) == [BEFORE_OFF_REASON]
    assert len(fx_bn_nodes(out)) == 1


class BnTwoConvs(nn.Module):
    def __init__(self, pad_b: int = 0, third=None):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.a = nn.Conv2d(4, 6, 3)
        self.b = nn.Conv2d(4, 6, 3, padding=pad_b)
        self.third = third

    def forward(self, x):
        y = self.bn(x)
        return self.a(y), self.b(y), *((self.third(y),) if self.third is not None else ())


def test_bn_read_by_two_convs_folds_into_both():
    model = randomize_bn(BnTwoConvs()).eval()
    out, pr = fold(model)
    check_folded(model, out, pr, (torch.randn(2, 4, 8, 8),))


def test_bn_read_by_a_zero_padding_conv_is_refused_for_all_readers():
    model = randomize_bn(BnTwoConvs(pad_b=1)).eval()
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(2, 4, 8, 8),), "")
    assert pr.matched == 2
    assert any("also used by b: " + ZERO_PAD_REASON in r for r in reasons(pr)), reasons(pr)
    assert any(r.endswith(ZERO_PAD_REASON) and "also used" not in r for r in reasons(pr)), reasons(pr)


def test_bn_read_by_a_conv_and_something_else_is_refused():
    model = randomize_bn(BnTwoConvs(third=nn.ReLU())).eval()
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(2, 4, 8, 8),), "the BatchNorm output is also used by")
    assert any("third: it is not a conv / linear" in r for r in reasons(pr)), reasons(pr)


# --- must not fold ------------------------------------------------------------------------------------------
def test_training_mode_is_refused():
    model = seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1)).train()
    state = copy.deepcopy(model.state_dict())
    out, report = lkfx.transform(model, ["fold_bn"], return_report=True)
    pr = report["fold_bn"]
    assert pr.matched == 2 and pr.rewritten == 0
    assert all("training mode" in r for r in reasons(pr)), reasons(pr)
    assert out.training and len(fx_bn_nodes(out)) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    x = torch.randn(4, 3, 8, 8)
    assert_same_outputs(copy.deepcopy(model), out, (x,))  # both normalise with batch statistics


@pytest.mark.parametrize("inplace", [False, True])
def test_training_mode_with_example_inputs_changes_no_state(inplace):
    """Shape propagation runs the model: a training-mode BN must not update the statistics it keeps."""
    model = seq(nn.Linear(10, 7), nn.BatchNorm1d(7)).train()
    state = copy.deepcopy(model.state_dict())
    out, report = lkfx.transform(model, ["fold_bn"], example_inputs=(torch.randn(5, 10),), inplace=inplace,
                                 return_report=True)
    assert not report.modified and all("training mode" in r for r in reasons(report["fold_bn"]))
    for module in (model, out):
        assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())


class ConvUsedTwice(nn.Module):
    def __init__(self, as_output: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.as_output = as_output

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return (z, y) if self.as_output else z + y


@pytest.mark.parametrize("as_output,reason", [(False, "also used by add"),
                                              (True, "also used by graph output")])
def test_conv_output_used_elsewhere_is_refused(as_output, reason):
    model = randomize_bn(ConvUsedTwice(as_output)).eval()
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(2, 3, 8, 8),), reason)


def test_bn_without_running_stats_is_refused():
    model = seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, track_running_stats=False))
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(4, 3, 8, 8),), "no constant running statistics")


# --- shared weights -----------------------------------------------------------------------------------------
class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(self.conv(x)), self.bn2(self.conv(x * 2))


def test_shared_conv_module_folds_into_copies():
    model = randomize_bn(SharedConv()).eval()
    out, pr = fold(model)
    check_folded(model, out, pr, (torch.randn(2, 3, 8, 8),), n=2)
    assert any("folded into a copy" in n for n in pr.notes), pr.notes
    convs = [m for m in out.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 2 and convs[0].weight is not convs[1].weight


class TiedConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3)
        self.b = nn.Conv2d(3, 6, 3)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.a(x)), self.b(x)


def test_tied_weight_is_folded_into_a_copy():
    model = randomize_bn(TiedConvs()).eval()
    out, pr = fold(model)
    check_folded(model, out, pr, (torch.randn(2, 3, 8, 8),))
    assert any("weight tensor is tied to" in n for n in pr.notes), pr.notes
    assert torch.equal(out.b.weight, model.a.weight)


class SharedFunctionalWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3))
        self.bn1 = nn.BatchNorm2d(6)
        self.bn2 = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn1(F.conv2d(x, self.w)), self.bn2(F.conv2d(x, self.w, padding=1)), F.conv2d(x, self.w)


def test_shared_functional_weight_keeps_the_original_for_other_users():
    model = randomize_bn(SharedFunctionalWeight()).eval()
    out, pr = fold(model)
    check_folded(model, out, pr, (torch.randn(2, 3, 8, 8),), n=2)
    assert sum("folded into a copy" in n for n in pr.notes) == 2, pr.notes
    assert torch.equal(out.w, model.w)


# --- functional forms ---------------------------------------------------------------------------------------
class FunctionalConvBn(nn.Module):
    def __init__(self, use_torch_batch_norm: bool, computed_weight: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(6, 3, 3, 3, generator=g))
        self.b = nn.Parameter(torch.randn(6, generator=g))
        self.gamma = nn.Parameter(torch.rand(6, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(6, generator=g))
        self.register_buffer("mean", torch.randn(6, generator=g))
        self.register_buffer("var", torch.rand(6, generator=g) + 0.25)
        self.use_torch_batch_norm = use_torch_batch_norm
        self.computed_weight = computed_weight

    def forward(self, x):
        w = self.w * 2 if self.computed_weight else self.w
        y = F.conv2d(x, w, self.b, stride=2, padding=1)
        if self.use_torch_batch_norm:
            return torch.batch_norm(y, self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-3, False)
        return F.batch_norm(y, self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


@pytest.mark.parametrize("use_torch_batch_norm", [False, True])
def test_functional_conv_bn(use_torch_batch_norm):
    model = FunctionalConvBn(use_torch_batch_norm).eval()
    out, pr = fold(model)
    check_folded(model, out, pr, (torch.randn(2, 3, 9, 9),))
    attrs = {n.target for n in out.graph.nodes if n.op == "get_attr"}
    assert attrs.isdisjoint({"mean", "var", "gamma", "beta"})


def test_functional_computed_weight_is_refused():
    model = FunctionalConvBn(False, computed_weight=True).eval()
    out, pr = fold(model)
    check_refused(model, out, pr, (torch.randn(2, 3, 9, 9),), "the conv weight is computed in the graph")


def test_aten_graph_from_make_fx():
    model = seq(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                nn.ConvTranspose2d(6, 4, 2, stride=2, groups=2), nn.BatchNorm2d(4))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        gm = make_fx(model)(x)
    assert len(fx_bn_nodes(gm)) == 2
    out, pr = fold(gm)
    check_folded(gm, out, pr, (x,), n=2)
    assert fx_getitems(out) == []
    assert_same_outputs(model, out, (x,))


def test_aten_graph_from_torch_export():
    """torch.export's decomposed graph uses the eval-only op aten._native_batch_norm_legit_no_training."""
    model = seq(nn.Conv2d(3, 6, 3, groups=3), nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1))
    x = torch.randn(2, 3, 8, 8)
    gm = torch.export.export(model, (x,)).run_decompositions().module()
    eval_bn = torch.ops.aten._native_batch_norm_legit_no_training.default
    assert any(n.target is eval_bn for n in gm.graph.nodes)
    out, pr = fold(gm)
    check_folded(gm, out, pr, (x,), n=2)
    assert_same_outputs(model, out, (x,))


# --- pass properties ----------------------------------------------------------------------------------------
def test_idempotent():
    model = seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 1),
                nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False))
    once, pr1 = fold(model)
    assert pr1.rewritten == 2
    twice, pr2 = fold(once)
    assert (pr2.rewritten, pr2.modified) == (0, False)
    assert twice.code == once.code
    assert twice.state_dict().keys() == once.state_dict().keys()
    assert all(torch.equal(v, once.state_dict()[k]) for k, v in twice.state_dict().items())
    assert_same_outputs(model, twice, (torch.randn(2, 3, 8, 8),))


def test_inplace_true_mutates_and_inplace_false_does_not():
    model = seq(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lkfx.transform(model, ["fold_bn"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    reference = copy.deepcopy(model)
    out = lkfx.transform(model, ["fold_bn"], inplace=True)
    assert not torch.equal(model[0].weight, before["0.weight"])
    assert_same_outputs(reference, out, (torch.randn(2, 3, 8, 8),))


def test_conv_with_computed_groups_is_refused_not_crashed():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(F.conv2d(x, self.w, None, 1, 1, 1, x.shape[1]))

    net = Net().eval()
    x = torch.randn(1, 4, 8, 8)
    out, report = lkfx.transform(net, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    assert report["fold_bn"].rewritten == 0
    assert any("groups are computed" in s.reason for s in report["fold_bn"].skipped)
