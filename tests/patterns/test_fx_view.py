"""FxView's rewriting helpers: `swap` (a new module where a conv was) and `fresh_name`."""

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lkfx.graph.fx import propagate_shapes
from lkfx.patterns.fx import FxView


class Doubled(nn.Module):
    """Stands in for a replacement block: the same conv, output doubled (so a test sees which calls it serves)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return 2 * self.conv(x)


class TwiceCalled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))
        self.once = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.once(self.body(self.body(x)))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, 3, 3))
        self.conv2d_mine = nn.Identity()  # takes the first name swap would give

    def forward(self, x):
        return F.conv2d(self.conv2d_mine(x), self.w, padding=1)


def conv_nodes(view: FxView) -> list[fx.Node]:
    return view.candidates(frozenset(["conv"]))


def test_swap_module_called_once_in_place():
    gm = fx.symbolic_trace(TwiceCalled().eval())
    view = FxView(gm)
    once = next(n for n in conv_nodes(view) if n.target == "once")
    new = Doubled(gm.once)
    view.swap(once, new, "x")
    gm = view.finish()
    assert gm.once is new and once.target == "once"
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["body.0", "body.0", "once"]


def test_swap_module_called_twice_only_this_call():
    torch.manual_seed(0)
    model = TwiceCalled().eval()
    gm = fx.symbolic_trace(model)
    view = FxView(gm)
    first, second = (n for n in conv_nodes(view) if n.target == "body.0")
    view.swap(first, Doubled(model.body[0]), "x")
    assert first.target == "body_0_x" and second.target == "body.0"  # the other call keeps the old module
    view.swap(second, Doubled(model.body[0]), "x")  # now called once: replaced in place
    assert second.target == "body.0" and isinstance(gm.get_submodule("body.0"), Doubled)
    gm = view.finish()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model.once(2 * model.body[0](2 * model.body[0](x)))
        torch.testing.assert_close(gm(x), expected)


def test_swap_functional_conv_under_fresh_name_keeps_meta():
    torch.manual_seed(0)
    model = Functional().eval()
    gm = fx.symbolic_trace(model)
    x = torch.randn(1, 3, 8, 8)
    propagate_shapes(gm, (x,))
    view = FxView(gm)
    (node,) = conv_nodes(view)
    meta = node.meta["tensor_meta"]
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
    conv.weight = model.w
    view.swap(node, Doubled(conv), "mine")
    gm = view.finish()
    (new,) = [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), Doubled)]
    assert new.target == "conv2d_mine_1" and new.meta["tensor_meta"] is meta
    with torch.no_grad():
        torch.testing.assert_close(gm(x), 2 * model(x))


def test_fresh_name_numbers_taken_paths():
    gm = fx.symbolic_trace(TwiceCalled())
    view = FxView(gm)
    assert view.fresh_name("free") == "free"
    assert view.fresh_name("once") == "once_1"
    assert view.fresh_name("body.0") == "body.0_1"  # a dotted path names a submodule's attribute
    assert view.fresh_name("body.x") == "body.x"
