"""lower_dwconv: FX (modules, functional convs, ATen graphs with placeholder weights) swaps large depthwise convs
for torch.ops.lkfx.dwconv2d with equal outputs and gradients; ONNX writes the TensorRT plugin node, which runs in
onnxruntime through lkfx.backends.ort_ops and matches the original; refusals come with reasons."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, feeds_for, init, make_model, reasons
from onnx import helper

import lkfx
from lkfx.backends import ort_ops
from lkfx.backends.dwconv_plugin import PLUGIN_DOMAIN, PLUGIN_NAME, PLUGIN_NAMESPACE, PLUGIN_VERSION
from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError
from lkfx.graph import onnx as gonnx


def _dwconv_nodes(gm) -> list:
    import lkfx.backends.dwconv_op  # noqa: F401

    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.lkfx.dwconv2d.default]


class Mixed(nn.Module):
    """Convs to lower (13x13, even 10x10 'same' without bias, functional 9x9 stride 2) and convs to refuse."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(6, 6, 13, padding=6, groups=6)
        self.small = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.even = nn.Conv2d(6, 6, 10, padding="same", groups=6, bias=False)
        self.dense = nn.Conv2d(6, 6, 9, padding=4)
        self.dilated = nn.Conv2d(6, 6, 9, padding=8, dilation=2, groups=6)
        self.multiplier = nn.Conv2d(6, 12, 9, padding=4, groups=6)
        self.reflect = nn.Conv2d(12, 12, 9, padding=4, groups=12, padding_mode="reflect")
        self.stride3 = nn.Conv2d(12, 12, 9, stride=3, padding=4, groups=12)
        self.w = nn.Parameter(torch.randn(6, 1, 9, 9) * 0.1)

    def forward(self, x):
        x = self.small(self.big(x)).relu()
        x = self.dense(self.even(x))
        x = F.conv2d(x + self.dilated(x), self.w, None, 2, 4, 1, 6)
        return self.stride3(self.reflect(self.multiplier(x)))


def test_fx_lowers_large_depthwise_convs_and_refuses_the_rest():
    model = Mixed().eval()
    x = torch.randn(2, 6, 15, 15)
    before = copy.deepcopy(model.state_dict())
    out, report = lkfx.transform(model, ["lower_dwconv"], example_inputs=x, check=True, return_report=True)
    r = report["lower_dwconv"]
    assert (r.matched, r.rewritten) == (9, 3)
    assert len(_dwconv_nodes(out)) == 3
    text = " | ".join(reasons(r))
    for expected in ("below min_kernel=9", "not depthwise", "dilation (2, 2)", "padding mode 'reflect'",
                     "stride (3, 3)"):
        assert expected in text
    assert_same_outputs(model, out, (x,))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # input untouched
    assert type(model.big) is nn.Conv2d


def test_fx_lowered_model_trains_like_the_original():
    model = Mixed().train()
    x = torch.randn(2, 6, 15, 15)
    out = lkfx.transform(model, ["lower_dwconv"])
    assert out.training
    grads = []
    for m in (model, out):
        m.zero_grad()
        m(x).square().mean().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    for name in ("big.weight", "big.bias", "even.weight", "w"):
        err = max_rel_error([grads[0][name].numpy()], [grads[1][name].numpy()])
        assert err <= 1e-5, f"{name}: {err:.3g}"


def test_fx_aten_graph_with_placeholder_weights():
    """The graph a torch.compile backend gets: aten.convolution with parameters as placeholders (shapes only)."""
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    model = Mixed().eval()
    params = dict(model.named_parameters())
    x = torch.randn(1, 6, 15, 15)
    gm = make_fx(lambda p, x: functional_call(model, p, (x,)))(params, x)
    out, report = lkfx.transform(gm, ["lower_dwconv"], return_report=True)
    # ATen writes the reflect padding as its own op, leaving an unpadded depthwise conv: lowered too
    assert report["lower_dwconv"].rewritten == 4 and len(_dwconv_nodes(out)) == 4
    assert all(n.op == "placeholder" for node in _dwconv_nodes(out) for n in node.args[1:2])
    with torch.no_grad():
        assert max_rel_error([model(x).numpy()], [out(params, x).numpy()]) <= 1e-5


def test_min_kernel_option():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 5, padding=2, groups=4)).eval()
    out, report = lkfx.transform(model, [("lower_dwconv", {"min_kernel": 5})], return_report=True)
    assert report["lower_dwconv"].rewritten == 1
    out = lkfx.transform(model, [("lower_dwconv", {"min_kernel": 1})])
    assert len(_dwconv_nodes(out)) == 2
    double = lkfx.transform(copy.deepcopy(model).double(), [("lower_dwconv", {"min_kernel": 1})], return_report=True)
    assert double[1]["lower_dwconv"].rewritten == 0
    assert "the kernel takes float32, float16 and bfloat16" in reasons(double[1]["lower_dwconv"])[0]
    for bad in (0, "9", True):
        with pytest.raises(LkfxError, match="min_kernel"):
            lkfx.transform(model, [("lower_dwconv", {"min_kernel": bad})])


# --- ONNX ---------------------------------------------------------------------------------------------------
def _onnx_model(rng: np.random.Generator) -> onnx.ModelProto:
    def w(c, k, m=1):
        return (rng.standard_normal((c * m, 1, *k)) * 0.2).astype(np.float32)

    nodes = [
        helper.make_node("Conv", ["x", "w_big", "b_big"], ["a"], name="big", group=6, pads=[6, 6, 6, 6]),
        helper.make_node("Conv", ["a", "w_even"], ["b"], name="even", group=6, pads=[4, 4, 5, 5]),
        helper.make_node("Conv", ["b", "w_small"], ["c"], name="small", group=6, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c", "w_s2", "b_s2"], ["d"], name="stride2", group=6, strides=[2, 2],
                         pads=[4, 4, 4, 4]),
        helper.make_node("Conv", ["d", "w_same"], ["e"], name="same_stride2", group=6, strides=[2, 2],
                         auto_pad="SAME_UPPER"),
        helper.make_node("Conv", ["d", "w_dil"], ["f"], name="dilated", group=6, dilations=[2, 2],
                         pads=[8, 8, 8, 8]),
        helper.make_node("Conv", ["d", "w_dense"], ["g"], name="dense", pads=[4, 4, 4, 4]),
    ]
    inits = [init("w_big", w(6, (13, 13))), init("b_big", rng.standard_normal(6).astype(np.float32)),
             init("w_even", w(6, (10, 10))), init("w_small", w(6, (3, 3))), init("w_s2", w(6, (9, 9))),
             init("b_s2", rng.standard_normal(6).astype(np.float32)), init("w_same", w(6, (9, 9))),
             init("w_dil", w(6, (9, 9))),
             init("w_dense", (rng.standard_normal((6, 6, 9, 9)) * 0.05).astype(np.float32))]
    return make_model(nodes, {"x": [2, 6, 17, 16]}, ["e", "f", "g"], inits)


def test_onnx_plugin_node_follows_tensorrt_conventions_and_runs_in_onnxruntime():
    model = _onnx_model(np.random.default_rng(0))
    before = model.SerializeToString()
    out, report = lkfx.transform(model, ["lower_dwconv"], return_report=True)
    assert model.SerializeToString() == before
    r = report["lower_dwconv"]
    assert (r.matched, r.rewritten) == (7, 3)
    text = " | ".join(reasons(r))
    for expected in ("below min_kernel=9", "auto_pad=SAME_UPPER with stride [2, 2]", "dilation (2, 2)",
                     "not depthwise"):
        assert expected in text
    onnx.checker.check_model(out, full_check=True)
    plugins = [n for n in out.graph.node if n.op_type == PLUGIN_NAME]
    assert [n.name for n in plugins] == ["big", "even", "stride2"]
    assert not onnx.defs.has(PLUGIN_NAME)  # never a built-in ONNX op's name
    for node in plugins:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert node.domain == PLUGIN_DOMAIN and len(node.input) == 3
        assert attrs["plugin_namespace"] == PLUGIN_NAMESPACE.encode()
        assert attrs["plugin_version"] == PLUGIN_VERSION.encode() and attrs["aot"] == 1
    assert {n.name: [*helper.get_attribute_value(a)] for n in plugins for a in n.attribute
            if a.name == "pads"}["even"] == [4, 4, 5, 5]
    assert (PLUGIN_DOMAIN, 1) in {(o.domain, o.version) for o in out.opset_import}
    feeds = feeds_for(model)
    err = max_rel_error(gonnx.run(model, feeds), ort_ops.run(out, feeds))
    assert err <= 1e-5, f"onnxruntime (plugin nodes as Python ops) max relative error {err:.3g}"


def test_onnx_from_a_torch_export():
    model = Mixed().eval()
    x = torch.randn(1, 6, 15, 15)
    proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
    out, report = lkfx.transform(proto, ["lower_dwconv"], return_report=True)
    assert report["lower_dwconv"].rewritten == 4  # the reflect-padded conv is exported as Pad + Conv
    feeds = {proto.graph.input[0].name: x.numpy()}
    assert max_rel_error(gonnx.run(proto, feeds), ort_ops.run(out, feeds)) <= 1e-5
