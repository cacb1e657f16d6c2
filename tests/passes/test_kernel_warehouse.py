"""kernel_warehouse pass: stage grouping with the official handover, depthwise warehouses, parameter counts
equal to the paper's models, KW(1x) at tau = 1 equal to the static model, real torchvision models training
forward and backward, options and refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from helpers import TOL, randomize_bn

import lkfx
from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError
from lkfx.modules.kernel_warehouse import KWConv

X64 = torch.randn(2, 3, 64, 64)


def kw(model: nn.Module, example=X64, **options):
    return lkfx.transform(model, [("kernel_warehouse", options)], example_inputs=example, return_report=True)


def warehouses(model: nn.Module) -> list[list[str]]:
    """Names of the KW convs sharing each warehouse, in order of first use."""
    groups: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        if isinstance(m, KWConv):
            groups.setdefault(id(m._warehouse[0]), []).append(name)
    return list(groups.values())


def millions(model: nn.Module) -> float:
    return round(sum(p.numel() for p in model.parameters()) / 1e6, 2)


def test_resnet18_stages_follow_the_official_handover():
    out, report = kw(torchvision.models.resnet18())
    stage = [f"layer{i}.{b}.conv{c}" for i in range(1, 5) for b in range(2) for c in (1, 2)]
    # official kw_resnet: a stage's first conv1 and its downsample use the previous stage's warehouse
    expected = [stage[:4] + ["layer2.0.conv1", "layer2.0.downsample.0"],
                stage[5:8] + ["layer3.0.conv1", "layer3.0.downsample.0"],
                stage[9:12] + ["layer4.0.conv1", "layer4.0.downsample.0"],
                stage[13:]]
    assert warehouses(out) == expected
    pr = report["kernel_warehouse"]
    assert pr.matched == 20 and pr.rewritten == 19
    assert [s.where for s in pr.skipped] == ["conv1"] and "stem" in pr.skipped[0].reason
    assert any(n.startswith("warehouse stage0: 6 convs, cells 64x64, n=56, m=[9, 9, 9, 9, 18, 2]")
               for n in pr.notes)
    assert any("parameters 11689512 -> 11932148" in n for n in pr.notes)


def test_resnet50_strided_3x3_stays_in_the_new_stage():
    groups = warehouses(kw(torchvision.models.resnet50())[0])
    assert len(groups) == 4
    assert groups[0][-2:] == ["layer2.0.conv1", "layer2.0.downsample.0"]
    assert groups[1][:2] == ["layer2.0.conv2", "layer2.0.conv3"]  # conv2 reads an inner tensor: no handover
    assert groups[0][:4] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.0.downsample.0"]


@pytest.mark.parametrize("budget,params", [(0.5, 7.43), (1, 11.93), (2, 23.24), (4, 45.86)])
def test_resnet18_parameters_equal_the_papers(budget, params):
    assert millions(kw(torchvision.models.resnet18(), budget=budget)[0]) == params


@pytest.mark.parametrize("budget,nonlocal_basis,params", [(0.5, 1 / 16, 17.64), (1, 1.0, 28.05)])
def test_resnet50_parameters_equal_the_papers(budget, nonlocal_basis, params):
    # the official ResNet50 keeps layer1's first 1x1 and its stride-1 downsample static
    out = kw(torchvision.models.resnet50(), budget=budget, nonlocal_basis=nonlocal_basis,
             exclude=("stem", r"layer1\.0\.(conv1|downsample)"))[0]
    assert millions(out) == params


def test_mobilenet_v2_depthwise_warehouses():
    out, report = kw(torchvision.models.mobilenet_v2())
    for group in warehouses(out):
        convs = [out.get_submodule(n) for n in group]
        dw = [c.groups > 1 and c.groups == c.in_channels for c in convs]
        assert all(dw) or not any(dw), group
        if all(dw):
            assert convs[0].warehouse.layout.cell_in == 1
    names = [n.split(":")[0] for n in report["kernel_warehouse"].notes if n.startswith("warehouse")]
    assert "warehouse stage0_dw" in names and "warehouse stage4" in names


def official_mobilenet_v2(split_pointwise: bool) -> dict[str, str]:
    """The official kw_mobilenetv2 grouping as a sharing mapping: stages by block setting (t, c, n, s), a
    stage's first block handed over whole, the stem dynamic; 4x keeps expand and project convs apart."""
    stage_of_setting = [1, 2, 3, 4, 5, 6, 6]
    setting = [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6]  # of features.1 .. features.17
    pw0, pw1 = ("pw0", "pw1") if split_pointwise else ("pw", "pw")
    mapping = {"features.0.0": "stem", "features.18.0": f"s6_{pw1}"}
    for i, idx in enumerate(setting, start=1):
        handover = idx > 0 and setting[i - 2] != idx and stage_of_setting[idx] != stage_of_setting[idx - 1]
        s = stage_of_setting[idx] - 1 if handover else stage_of_setting[idx]
        if i == 1:
            mapping.update({"features.1.conv.0.0": f"s{s}_dw", "features.1.conv.1": f"s{s}_{pw1}"})
        else:
            mapping.update({f"features.{i}.conv.0.0": f"s{s}_{pw0}", f"features.{i}.conv.1.0": f"s{s}_dw",
                            f"features.{i}.conv.2": f"s{s}_{pw1}"})
    return mapping


@pytest.mark.parametrize("budget,split,params", [(1, False, 5.17), (4, True, 11.38)])
def test_explicit_sharing_reproduces_official_mobilenet_v2(budget, split, params):
    out, report = lkfx.transform(torchvision.models.mobilenet_v2(), [("kernel_warehouse", {
        "budget": budget, "sharing": official_mobilenet_v2(split), "exclude": ()})], return_report=True)
    assert report["kernel_warehouse"].rewritten == 52
    assert millions(out) == params


@pytest.mark.parametrize("budget", [1, 2])
def test_at_tau_one_kw_equals_the_static_model(budget):
    torch.manual_seed(0)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).eval()
    x = torch.randn(2, 3, 48, 48)
    out, report = lkfx.transform(model, [("kernel_warehouse", {"budget": budget})], example_inputs=(x,),
                                 check=True, return_report=True)
    assert report.check["max_rel_error"] <= TOL
    lkfx.set_temperature(out, 0.5)
    with torch.no_grad():
        assert max_rel_error([model(x).numpy()], [out(x).numpy()]) > 1e-3  # now the attention mixes in


def test_half_budget_is_a_different_model():
    assert not lkfx.list_passes()[[p["name"] for p in lkfx.list_passes()].index("kernel_warehouse")]["exact"]
    from lkfx.errors import CheckError

    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(CheckError):
        lkfx.transform(model, [("kernel_warehouse", {"budget": 0.5})], example_inputs=(X64,), check=True)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_train_forward_backward(name):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    out, _ = kw(model, torch.randn(2, 3, 32, 32), budget=0.5)
    assert out.training
    lkfx.set_temperature(out, 0.5)
    opt = torch.optim.SGD(out.parameters(), lr=0.01)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(out(x), y)
    loss.backward()
    cells = [m.warehouse.cells for m in out.modules() if isinstance(m, KWConv) and hasattr(m, "warehouse")]
    assert cells and all(c.grad is not None and c.grad.abs().sum() > 0 for c in cells)
    before = [c.detach().clone() for c in cells]
    opt.step()
    assert all(not torch.equal(a, c) for a, c in zip(before, cells, strict=True))
    assert torch.isfinite(out.eval()(x)).all()


def test_caller_model_untouched_stem_option_and_copies():
    model = torchvision.models.resnet18()
    out, report = kw(model, exclude=())
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.layer1[0].conv1, nn.Conv2d)
    assert isinstance(out.conv1, KWConv) and report["kernel_warehouse"].rewritten == 20
    twin = copy.deepcopy(out)
    assert warehouses(twin) == warehouses(out)
    owner, user = twin.get_submodule("layer1.0.conv1"), twin.get_submodule("layer2.0.downsample.0")
    assert user._warehouse[0] is owner.warehouse is not out.get_submodule("layer1.0.conv1").warehouse


def test_exclude_patterns():
    out, report = kw(torchvision.models.resnet18(), exclude=("stem", r"^layer4\.", "downsample"))
    assert isinstance(out.get_submodule("layer4.1.conv2"), nn.Conv2d)
    assert isinstance(out.get_submodule("layer3.0.downsample.0"), nn.Conv2d)
    assert isinstance(out.get_submodule("layer3.0.conv1"), KWConv)
    reasons = {s.where: s.reason for s in report["kernel_warehouse"].skipped}
    assert reasons["layer4.1.conv2"] == "excluded by '^layer4\\\\.'" and len(reasons) == 1 + 5 + 2


def test_explicit_sharing_mapping():
    mapping = {"layer1.0.conv1": "a", "layer1.1.conv1": "a", "layer2.1.conv2": "b"}
    out, report = lkfx.transform(torchvision.models.resnet18(), [("kernel_warehouse", {"sharing": mapping})],
                                 return_report=True)
    assert warehouses(out) == [["layer1.0.conv1", "layer1.1.conv1"], ["layer2.1.conv2"]]
    assert report["kernel_warehouse"].rewritten == 3
    with pytest.raises(LkfxError, match="not in the graph"):
        lkfx.transform(torchvision.models.resnet18(), [("kernel_warehouse", {"sharing": {"nope": "a"}})])


def test_errors_and_options():
    with pytest.raises(LkfxError, match="needs example_inputs"):
        lkfx.transform(torchvision.models.resnet18(), ["kernel_warehouse"])
    for bad in ({"budget": 0}, {"cell_ratio": 2}, {"reduction": 0}, {"max_attention": 0},
                {"sharing": "layer"}, {"colour": 1}):
        with pytest.raises(LkfxError):
            lkfx.transform(torchvision.models.resnet18(), [("kernel_warehouse", bad)], example_inputs=X64)


class Functional(nn.Module):
    """A functional conv, a conv module called twice, and a squeeze-excitation conv on pooled features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.1)
        self.twice = nn.Conv2d(16, 16, 3, padding=1)
        self.se = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = F.relu(F.conv2d(self.stem(x), self.weight, None, 2, 1))
        x = self.twice(self.twice(x))
        return x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))


def test_functional_shared_and_pooled_convs():
    torch.manual_seed(0)
    model = Functional()
    x = torch.randn(2, 3, 16, 16)
    out, report = kw(model, x)
    pr = report["kernel_warehouse"]
    reasons = {s.where: s.reason for s in pr.skipped}
    assert pr.rewritten == 1 and len(pr.skipped) == 4 and set(reasons) == {"stem", "twice", "se"}
    assert "called 2 times" in reasons["twice"] and "1 x 1 spatially" in reasons["se"]
    assert "weight" not in dict(out.named_parameters())  # the functional conv's weight now lives in the cells
    with torch.no_grad():
        assert max_rel_error([model(x).numpy()], [out.eval()(x).numpy()]) <= TOL


def test_grouped_convs_get_their_own_warehouse():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 128, 1),
                        nn.Conv2d(128, 128, 3, padding=1, groups=32), nn.Conv2d(128, 64, 1),
                        nn.Conv2d(64, 64, 3, padding=1, groups=32))
    out, report = kw(net, torch.randn(2, 3, 8, 8))
    assert warehouses(out) == [["1", "3"], ["2", "4"]]
    notes = report["kernel_warehouse"].notes
    assert any(n.startswith("warehouse stage0: 2 convs, cells 64x64") for n in notes)
    assert any(n.startswith("warehouse stage0_grouped: 2 convs, cells 64x2") for n in notes)


def test_warehouse_with_a_tiny_gcd_is_refused():
    # channel counts 40 / 112 / 80 (gcd 8; cells 8x4 at 1/2x): ~200 times more attention than cell parameters
    net = nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.Conv2d(40, 112, 1), nn.Conv2d(112, 80, 1),
                        nn.MaxPool2d(2), nn.Conv2d(80, 80, 3, padding=1))
    x = torch.randn(2, 3, 8, 8)
    out, report = kw(net, x, budget=0.5)
    reasons = {s.where: s.reason for s in report["kernel_warehouse"].skipped}
    assert set(reasons) == {"0", "1", "2"}
    assert "cells would be 8x4 (gcd of the channel counts [40, 80, 112])" in reasons["1"]
    assert "max_attention=64" in reasons["1"]
    assert isinstance(out.get_submodule("1"), nn.Conv2d) and isinstance(out.get_submodule("4"), KWConv)
    out, report = kw(net, x, budget=0.5, max_attention=1000)
    assert isinstance(out.get_submodule("1"), KWConv) and report["kernel_warehouse"].rewritten == 3
