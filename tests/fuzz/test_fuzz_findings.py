"""What the fuzz campaign found, each as a minimal reproduction (scripts/fuzz_campaign.py, networks by seed).

1. A conv module whose parameters are also read by a functional call (``self.conv(x)`` and
   ``F.conv2d(x, self.conv.weight)``): `fold_bn` folded the BN into the module's weight in place, so the functional
   call computed with the folded weight (max relative error 0.62); `reparam_large_kernel` swapped the module and
   the graph's read of ``conv.weight`` crashed (and it swapped the functional call alone, untying the weights).
   `FxView.weight_shared_with` now names both directions of sharing: fold_bn folds into a copy,
   reparam_large_kernel refuses both convs with the reason.
2. ``conv -> BN -> BN``: `fold_bn` folds one BatchNorm per run (the second BN's producer is a BN when the rules
   are matched), so a second run folds again. Recorded, not fixed (see the test).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from helpers import assert_same_outputs, randomize_bn, reasons
from torch import nn

import lkfx


class SharedFunctional(nn.Module):
    def __init__(self, groups: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)), F.conv2d(x, self.conv.weight, self.conv.bias, padding=1, groups=self.conv.groups)


def test_fold_bn_keeps_a_functional_reader_of_the_module_weight():
    model = randomize_bn(SharedFunctional()).eval()
    x = torch.randn(2, 4, 8, 8)
    out, report = lkfx.transform(model, ["fold_bn"], example_inputs=x, return_report=True)
    assert report["fold_bn"].rewritten == 1
    assert any("conv.weight and conv.bias also read directly" in n for n in report["fold_bn"].notes)
    assert_same_outputs(model, out, (x,))


def test_reparam_large_kernel_refuses_a_module_whose_weight_is_read_directly():
    model = SharedFunctional(groups=4).eval()
    x = torch.randn(2, 4, 8, 8)
    out, report = lkfx.transform(model, [("reparam_large_kernel", {"kernel_size": 7, "min_kernel": 3})],
                                 example_inputs=x, return_report=True)
    assert report["reparam_large_kernel"].rewritten == 0
    assert sorted(reasons(report["reparam_large_kernel"])) == [
        "weight shared (conv.weight and conv.bias also read directly by the graph); swapping one use would untie it",
        "weight shared (weight 'conv.weight' is also used by calls of module 'conv'); swapping one use would untie it"]
    assert_same_outputs(model, out, (x,))


def test_fold_bn_folds_a_chain_of_batchnorms_in_one_run():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))).eval()
    report = lkfx.transform(model, ["fold_bn"], return_report=True)[1]
    assert report["fold_bn"].rewritten == 2
    x = torch.randn(2, 3, 8, 8)
    assert_same_outputs(model, lkfx.transform(model, ["fold_bn"]), (x,))
    again = lkfx.transform(lkfx.transform(model, ["fold_bn"]), ["fold_bn"], return_report=True)[1]
    assert again["fold_bn"].rewritten == 0


def test_fold_bn_onnx_folds_a_chain_of_batchnorms_in_one_run(tmp_path):
    from lkfx.zoo import export_onnx

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4))).eval()
    export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    out, report = lkfx.transform(str(tmp_path / "m.onnx"), ["fold_bn"], check=True, return_report=True)
    assert report["fold_bn"].rewritten == 2
    assert not [n for n in out.graph.node if n.op_type == "BatchNormalization"]
