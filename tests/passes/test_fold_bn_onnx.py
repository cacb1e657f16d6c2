"""fold_bn on the ONNX frontend: each case proves the fold fires (counts, BatchNormalization gone) or refuses
with its reason, and that onnxruntime computes the same outputs (fp32 max relative error <= 1e-5). Every
result also passes onnx.checker, keeps the opset, and leaves the input ModelProto byte-identical
(see `fold_onnx`)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from helpers import (
    assert_onnx_same,
    bn_initializers,
    bn_node,
    const_node,
    fold_onnx,
    init,
    initializer,
    make_model,
    op_types,
    rand,
    randomize_bn,
    reasons,
)
from onnx import helper, numpy_helper

import lkfx
from lkfx.passes.fold_bn import BEFORE_OFF_REASON, ZERO_PAD_REASON

SIZE = {1: (19,), 2: (11, 10), 3: (7, 6, 8)}


def check_folded(model, out, pr, n: int = 1) -> None:
    assert (pr.matched, pr.rewritten, pr.skipped, pr.modified) == (n, n, [], True)
    assert "BatchNormalization" not in op_types(out)
    compute = [op for op in op_types(model) if op not in ("BatchNormalization", "Identity", "Constant")]
    assert [op for op in op_types(out) if op not in ("Identity", "Constant")] == compute
    assert_onnx_same(model, out)


def check_refused(model, out, pr, reason: str, n_bn: int = 1) -> None:
    assert pr.rewritten == 0 and not pr.modified
    assert pr.skipped, "expected a refusal"
    assert all(reason in r for r in reasons(pr)), reasons(pr)
    assert op_types(out).count("BatchNormalization") == n_bn
    assert_onnx_same(model, out)


def conv_model(nd: int, cin: int, cout: int, *, k: int = 3, bias: bool = True, transpose: bool = False,
               bn_first: bool = False, affine: bool = True, seed: int = 0, bn_attrs=None, **attrs):
    """x -> Conv|ConvTranspose -> BN -> y (or x -> BN -> Conv -> y with bn_first)."""
    rng = np.random.default_rng(seed)
    g = attrs.get("group", 1)
    wshape = (cin, cout // g) if transpose else (cout, cin // g)
    inits = [init("W", rand(rng, *wshape, *(k,) * nd))]
    if bias:
        inits.append(init("B", rand(rng, cout)))
    inits += bn_initializers(rng, "bn", cin if bn_first else cout, affine=affine)
    op = "ConvTranspose" if transpose else "Conv"
    conv_in = "xn" if bn_first else "x"
    conv = helper.make_node(op, [conv_in, "W", "B"] if bias else [conv_in, "W"], ["y" if bn_first else "c"],
                            name="conv", **attrs)
    bn = bn_node("bn", *(("x", "xn") if bn_first else ("c", "y")), **(bn_attrs or {}))
    nodes = [bn, conv] if bn_first else [conv, bn]
    return make_model(nodes, {"x": (2, cin, *SIZE[nd])}, ["y"], inits)


# --- Conv -> BN ---------------------------------------------------------------------------------------------
CONV_CASES = [
    # cin, cout, options
    (4, 6, {}),
    (4, 6, {"bias": False}),
    (4, 6, {"strides": [2], "pads": [1]}),
    (4, 6, {"dilations": [2], "pads": [2]}),
    (4, 6, {"auto_pad": "SAME_UPPER"}),
    (6, 6, {"group": 6}),  # depthwise
    (6, 12, {"group": 3, "strides": [2], "bias": False}),  # grouped
]


def per_dim(nd: int, options: dict) -> dict:
    """Spread one-value attribute lists over nd spatial dims (pads: begins then ends)."""
    out = {}
    for key, value in options.items():
        if key in ("strides", "dilations", "output_padding"):
            out[key] = value * nd
        elif key == "pads":
            out[key] = value * 2 * nd
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cin,cout,options", CONV_CASES)
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_bn(nd, cin, cout, options, affine):
    model = conv_model(nd, cin, cout, affine=affine, **per_dim(nd, options))
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)
    assert out.graph.node[0].input[1] != "W" and len(out.graph.node[0].input) == 3


def test_conv_with_empty_bias_name_bn():
    """An omitted optional input may be written as the empty name: the fold fills it with the new bias."""
    model = conv_model(2, 4, 6, bias=False)
    model.graph.node[0].input.append("")
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)
    assert "" not in out.graph.node[0].input


@pytest.mark.parametrize("options", [
    {},
    {"bias": False},
    {"strides": [2], "output_padding": [1]},
    {"strides": [2], "pads": [1], "output_padding": [1], "dilations": [2]},
    {"group": 2},
    {"group": 3, "strides": [2], "output_padding": [1], "bias": False},
    {"group": 6, "strides": [3], "pads": [1], "output_padding": [2]},
])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_transpose_bn(nd, options):
    g = options.get("group", 1)
    cout = 12 if g == 6 else 9 if g == 3 else 8
    model = conv_model(nd, 6, cout, transpose=True, **per_dim(nd, options))
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)


# --- Gemm -> BN ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_c", [True, False])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.9)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_bn(trans_b, alpha, beta, with_c):
    rng = np.random.default_rng(3)
    inits = [init("W", rand(rng, *((7, 10) if trans_b else (10, 7))))]
    if with_c:
        inits.append(init("C", rand(rng, 7)))
    inits += bn_initializers(rng, "bn", 7)
    gemm = helper.make_node("Gemm", ["x", "W", "C"] if with_c else ["x", "W"], ["g"], name="gemm",
                            transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([gemm, bn_node("bn", "g", "y", epsilon=1e-3)], {"x": (5, 10)}, ["y"], inits)
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)
    attrs = {a.name: helper.get_attribute_value(a) for a in out.graph.node[0].attribute}
    assert (attrs["alpha"], attrs["beta"], attrs["transB"]) == (1.0, 1.0, trans_b)


@pytest.mark.parametrize("c_shape", [None, (7,), (5, 7)])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.7, 1.9)])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_bn_gemm(trans_b, alpha, beta, c_shape):
    rng = np.random.default_rng(4)
    inits = [init("W", rand(rng, *((7, 10) if trans_b else (10, 7))))]
    if c_shape:
        inits.append(init("C", rand(rng, *c_shape)))
    inits += bn_initializers(rng, "bn", 10)
    gemm = helper.make_node("Gemm", ["n", "W", "C"] if c_shape else ["n", "W"], ["y"], name="gemm",
                            transB=trans_b, alpha=alpha, beta=beta)
    model = make_model([bn_node("bn", "x", "n"), gemm], {"x": (5, 10)}, ["y"], inits)
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)


def test_bn_gemm_trans_a_is_refused():
    rng = np.random.default_rng(5)
    inits = [init("W", rand(rng, 5, 7))] + bn_initializers(rng, "bn", 10)
    gemm = helper.make_node("Gemm", ["n", "W"], ["y"], name="gemm", transA=1)
    model = make_model([bn_node("bn", "x", "n"), gemm], {"x": (5, 10)}, ["y"], inits)
    out, pr = fold_onnx(model)
    assert pr.rewritten == 0 and any("transA=1" in s.reason for s in pr.skipped)


# --- BN -> Conv ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options", [
    {},
    {"strides": [2], "dilations": [2]},
    {"group": 2},
    {"group": 4, "bias": False},
    {"auto_pad": "VALID"},
    {"pads": [0]},
])
@pytest.mark.parametrize("nd", [1, 2, 3])
def test_bn_conv(nd, options):
    cout = 8 if options.get("group") == 4 else 6
    model = conv_model(nd, 4, cout, bn_first=True, **per_dim(nd, options))
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)
    assert out.graph.node[0].input[0] == "x"


@pytest.mark.parametrize("options", [{"pads": [1]}, {"auto_pad": "SAME_UPPER"}, {"auto_pad": "SAME_LOWER"}])
def test_bn_zero_padded_conv_is_refused(options):
    model = conv_model(2, 4, 6, bn_first=True, **per_dim(2, options))
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, ZERO_PAD_REASON)


def test_bn_same_padded_1x1_conv_folds():
    model = conv_model(2, 4, 6, k=1, bn_first=True, auto_pad="SAME_UPPER")
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)


def test_before_option_off_leaves_bn_conv():
    model = conv_model(2, 4, 6, bn_first=True)
    out, pr = fold_onnx(model, before=False)
    assert (pr.matched, pr.rewritten) == (1, 0)
    assert reasons(pr) == [BEFORE_OFF_REASON]
    assert op_types(out) == ["BatchNormalization", "Conv"]


def two_readers(pads_b=(0, 0, 0, 0), third: str | None = None):
    """x -> BN -> conv_a (3x3), conv_b (3x3 with pads_b)[, third]."""
    rng = np.random.default_rng(5)
    inits = [init("W1", rand(rng, 6, 4, 3, 3)), init("W2", rand(rng, 6, 4, 3, 3)), *bn_initializers(rng, "bn", 4)]
    nodes = [bn_node("bn", "x", "xn"), helper.make_node("Conv", ["xn", "W1"], ["a"], name="conv_a"),
             helper.make_node("Conv", ["xn", "W2"], ["b"], name="conv_b", pads=list(pads_b))]
    outputs = ["a", "b"]
    if third:
        nodes.append(helper.make_node(third, ["xn"], ["c"], name="third"))
        outputs.append("c")
    return make_model(nodes, {"x": (2, 4, 8, 8)}, outputs, inits)


def test_bn_read_by_two_convs_folds_into_both():
    model = two_readers()
    out, pr = fold_onnx(model)
    check_folded(model, out, pr)


def test_bn_read_by_a_zero_padding_conv_is_refused_for_all_readers():
    model = two_readers(pads_b=(1, 1, 1, 1))
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, "")
    assert pr.matched == 2
    assert any(r.endswith("also used by conv_b: " + ZERO_PAD_REASON) for r in reasons(pr)), reasons(pr)


def test_bn_read_by_a_conv_and_something_else_is_refused():
    model = two_readers(third="Relu")
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, "the BatchNormalization output is also used by")
    assert any("third: it is not a Conv / Gemm" in r for r in reasons(pr)), reasons(pr)


# --- must not fold ------------------------------------------------------------------------------------------
def test_training_mode_is_refused():
    model = conv_model(2, 3, 6, bn_attrs={"training_mode": 1})
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, "training_mode=1")


def conv_used_twice(as_output: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    inits = [init("W", rand(rng, 6, 3, 3, 3)), init("B", rand(rng, 6)),
             *bn_initializers(rng, "bn", 6)]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    if not as_output:
        nodes.append(helper.make_node("Add", ["y", "c"], ["z"], name="add"))
    return make_model(nodes, {"x": (2, 3, 8, 8)}, ["y", "c"] if as_output else ["z"], inits)


@pytest.mark.parametrize("as_output,reason", [(False, "also used by add"),
                                              (True, "also used by graph output")])
def test_conv_output_used_elsewhere_is_refused(as_output, reason):
    model = conv_used_twice(as_output)
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, reason)


def test_bn_statistics_not_constant_are_refused():
    rng = np.random.default_rng(7)
    inits = [init("W", rand(rng, 6, 3, 3, 3)), *bn_initializers(rng, "bn", 6)[:3]]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(nodes, {"x": (2, 3, 8, 8), "bn_var": (6,)}, ["y"], inits)
    out, pr = fold_onnx(model)
    assert pr.rewritten == 0
    assert reasons(pr) == ["conv->bn: BatchNormalization scale / bias / mean / var are not constants"]
    assert op_types(out) == op_types(model)


def test_weight_computed_in_the_graph_is_refused():
    rng = np.random.default_rng(13)
    inits = [init("W0", rand(rng, 6, 3, 3, 3)), init("two", np.float32(2.0)), *bn_initializers(rng, "bn", 6)]
    nodes = [helper.make_node("Mul", ["W0", "two"], ["W"], name="scale_w"),
             helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(nodes, {"x": (2, 3, 8, 8)}, ["y"], inits)
    out, pr = fold_onnx(model)
    check_refused(model, out, pr, "the weight is not a constant")


# --- shared weights -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("through_identity", [False, True])
@pytest.mark.parametrize("both_have_bn", [False, True])
def test_shared_weight_is_folded_into_a_copy(through_identity, both_have_bn):
    rng = np.random.default_rng(8)
    w = rand(rng, 6, 3, 3, 3)
    inits = [init("W", w), init("B", rand(rng, 6)),
             *bn_initializers(rng, "bn1", 6), *bn_initializers(rng, "bn2", 6)]
    nodes = [helper.make_node("Identity", ["W"], ["W_id"], name="id")] if through_identity else []
    nodes += [helper.make_node("Conv", ["x", "W_id" if through_identity else "W", "B"], ["c1"], name="conv1"),
              bn_node("bn1", "c1", "y1"),
              helper.make_node("Conv", ["x", "W", "B"], ["c2"], name="conv2", pads=[1, 1, 1, 1])]
    relu = helper.make_node("Relu", ["c2"], ["y2"], name="relu")
    nodes.append(bn_node("bn2", "c2", "y2") if both_have_bn else relu)
    model = make_model(nodes, {"x": (2, 3, 8, 8)}, ["y1", "y2"], inits)
    out, pr = fold_onnx(model)
    n = 2 if both_have_bn else 1
    check_folded(model, out, pr, n=n)
    assert any("weight shared (also read by conv2); folded into a copy" in note for note in pr.notes), pr.notes
    assert "Identity" not in op_types(out)
    if not both_have_bn:
        conv2 = next(node for node in out.graph.node if node.name == "conv2")
        assert list(conv2.input[1:]) == ["W", "B"]
        np.testing.assert_array_equal(initializer(out, "W"), w)


# --- constants routed through Identity / Constant -----------------------------------------------------------
def test_weights_through_identity_and_constant_nodes():
    rng = np.random.default_rng(9)
    bn = {t.name: numpy_helper.to_array(t) for t in bn_initializers(rng, "bn", 6)}
    w, b = rand(rng, 6, 3, 3, 3), rand(rng, 6)
    inits = [init("W", w), init("mean_src", bn["bn_mean"])]
    nodes = [
        helper.make_node("Identity", ["W"], ["W_id"], name="w_identity"),
        const_node("B", b),
        const_node("bn_scale", bn["bn_scale"]),
        const_node("bn_bias", bn["bn_bias"]),
        helper.make_node("Identity", ["mean_src"], ["bn_mean"], name="mean_identity"),
        const_node("bn_var0", bn["bn_var"]),
        helper.make_node("Identity", ["bn_var0"], ["bn_var"], name="var_identity"),
        helper.make_node("Conv", ["x", "W_id", "B"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        bn_node("bn", "c", "y"),
    ]
    model = make_model(nodes, {"x": (2, 3, 8, 8)}, ["y"], inits)
    out, pr = fold_onnx(model)
    assert (pr.matched, pr.rewritten, pr.skipped) == (1, 1, [])
    assert op_types(out) == ["Conv"]
    assert {t.name for t in out.graph.initializer} == set(out.graph.node[0].input[1:])
    assert_onnx_same(model, out)


@pytest.mark.parametrize("bn_first", [False, True])
def test_bn_statistics_through_identity_and_constant_nodes(bn_first):
    """Only the BN reads Identity / Constant nodes: removing the BN must still leave no dead node behind."""
    rng = np.random.default_rng(12)
    bn = [numpy_helper.to_array(t) for t in bn_initializers(rng, "bn", 4)]
    inits = [init("W", rand(rng, 4, 4, 3, 3)), init("mean_src", bn[2])]
    stats = [const_node("bn_scale", bn[0]), const_node("bn_bias", bn[1]), const_node("bn_var", bn[3]),
             helper.make_node("Identity", ["mean_src"], ["bn_mean"], name="mean_identity")]
    if bn_first:
        nodes = [bn_node("bn", "x", "xn"), helper.make_node("Conv", ["xn", "W"], ["y"], name="conv")]
    else:
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(stats + nodes, {"x": (2, 4, 8, 8)}, ["y"], inits)
    out, pr = fold_onnx(model)
    assert (pr.matched, pr.rewritten, pr.skipped) == (1, 1, [])
    assert op_types(out) == ["Conv"]
    assert {t.name for t in out.graph.initializer} == set(out.graph.node[0].input[1:])
    assert_onnx_same(model, out)


def test_torchscript_export_with_identity_routed_statistics():
    """The TorchScript exporter (do_constant_folding=False) turns equal initializers into Identity nodes."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(3, 6, 3, padding=1)
            self.bn1 = torch.nn.BatchNorm2d(6)
            self.bn2 = torch.nn.BatchNorm2d(6)

        def forward(self, x):
            return self.bn1(self.conv1(x)) + self.bn2(self.conv2(x))

    torch.manual_seed(0)
    net = randomize_bn(Net()).eval()
    net.bn2.load_state_dict(net.bn1.state_dict())
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), f, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE)
    model = onnx.load_from_string(f.getvalue())
    assert "Identity" in op_types(model)
    out, pr = fold_onnx(model)
    assert (pr.matched, pr.rewritten, pr.skipped) == (2, 2, [])
    assert op_types(out) == ["Conv", "Conv", "Add"]
    assert_onnx_same(model, out)


# --- pass properties ----------------------------------------------------------------------------------------
def test_idempotent():
    rng = np.random.default_rng(10)
    inits = [init("W1", rand(rng, 6, 3, 3, 3)), init("W2", rand(rng, 4, 6, 1, 1)),
             init("W3", rand(rng, 4, 4, 3, 3)), *bn_initializers(rng, "bn1", 6),
             *bn_initializers(rng, "bn2", 6), *bn_initializers(rng, "bn3", 4)]
    nodes = [helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"), bn_node("bn1", "c1", "y1"),
             helper.make_node("Relu", ["y1"], ["r"], name="relu"), bn_node("bn2", "r", "r_n"),
             helper.make_node("Conv", ["r_n", "W2"], ["c2"], name="conv2"),
             helper.make_node("Conv", ["c2", "W3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
             bn_node("bn3", "c3", "y", training_mode=1)]
    model = make_model(nodes, {"x": (2, 3, 8, 8)}, ["y"], inits)
    once, pr1 = fold_onnx(model)
    assert (pr1.rewritten, len(pr1.skipped)) == (2, 1)
    twice, pr2 = fold_onnx(once)
    assert (pr2.rewritten, pr2.modified) == (0, False)
    assert twice.graph.SerializeToString() == once.graph.SerializeToString()
    assert_onnx_same(model, twice)


def test_opset_kept_and_inplace():
    model = conv_model(2, 3, 6, seed=11)
    model.opset_import[0].version = 13
    onnx.checker.check_model(model)
    out, _ = fold_onnx(model)
    assert out.opset_import[0].version == 13
    same = lkfx.transform(model, ["fold_bn"], inplace=True)
    assert same is model and "BatchNormalization" not in op_types(model)
