"""OnnxView.fresh_name / new_const, and onnx_pads checked against onnx's reference evaluator's auto_pad
(onnxruntime refuses auto_pad SAME_* with dilations)."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from helpers import init, make_model, rand
from onnx import helper
from onnx.reference import ReferenceEvaluator

from lkfx.graph import onnx as gonnx
from lkfx.patterns.onnx import OnnxView, auto_pad, onnx_pads


def conv_model(**attrs):
    rng = np.random.default_rng(0)
    k = attrs.pop("kernel", (4, 3))
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    return make_model([node], {"x": [1, 2, 9, 10]}, ["y"], [init("w", rand(rng, 2, 2, *k))])


def test_fresh_name_avoids_tensors_nodes_and_earlier_names():
    view = OnnxView(gonnx.to_graph(conv_model()))
    assert view.fresh_name("w") == "w_1"  # a tensor
    assert view.fresh_name("conv") == "conv_1"  # a node
    assert view.fresh_name("conv") == "conv_2"
    assert view.fresh_name("new") == "new"
    const = view.new_const("new", np.zeros(3, np.float32))
    assert isinstance(const, gs.Constant) and const.name == "new_1"


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 0, 2, 2]},
    {},
    {"auto_pad": "VALID"},
    {"auto_pad": "SAME_UPPER"},
    {"auto_pad": "SAME_LOWER"},
    {"auto_pad": "SAME_UPPER", "dilations": [2, 3]},
    {"auto_pad": "SAME_LOWER", "dilations": [3, 2], "kernel": (2, 5)},
])
def test_onnx_pads_match_the_reference_evaluator(attrs):
    model = conv_model(**attrs)
    (conv,) = [n for n in gonnx.to_graph(model).nodes if n.op == "Conv"]
    kernel = model.graph.initializer[0].dims[2:]
    pads = onnx_pads(conv, kernel)
    explicit = conv_model(**{k: v for k, v in attrs.items() if k not in ("auto_pad", "pads")},
                          pads=[b for b, _ in pads] + [e for _, e in pads])
    feeds = gonnx.random_inputs(model, 0)
    expected, got = (ReferenceEvaluator(m).run(None, feeds)[0] for m in (model, explicit))
    np.testing.assert_array_equal(got, expected)
    assert auto_pad(conv) == attrs.get("auto_pad", "NOTSET")
    if "pads" in attrs:
        assert pads == ((1, 2), (0, 2))
