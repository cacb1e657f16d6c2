"""merge_reparam on ONNX: each case proves the merge fires (one Conv left, no BatchNormalization, no Add) or
refuses with its reason, and that onnxruntime computes the same outputs (fp32 max relative error <= 1e-5). Every
result passes onnx.checker (full check), keeps the opset and leaves the input ModelProto byte-identical."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
import torch
from helpers import (
    assert_onnx_same,
    bn_initializers,
    bn_node,
    init,
    make_model,
    op_types,
    rand,
    randomize_bn,
    reasons,
)
from onnx import helper

import lkfx


def branches_model(cin: int, cout: int, convs: list[dict], *, hw=(9, 8), identity: str | None = None,
                   bn: bool = True, bn_after: bool = False, op: str = "Add", seed: int = 0,
                   extra_outputs: tuple = ()) -> onnx.ModelProto:
    """x -> [Conv_i (-> BN_i)] summed (Add chain or one Sum) [+ x | + BN(x)] [-> BN] -> y.
    Each conv dict: k (kernel, int or tuple), group, bias, and Conv attributes."""
    rng = np.random.default_rng(seed)
    nd = len(hw)
    nodes, inits, terms = [], [], []
    for i, spec in enumerate(convs):
        spec = dict(spec)
        k = spec.pop("k")
        k = (k,) * nd if isinstance(k, int) else k
        g = spec.get("group", 1)
        inits.append(init(f"W{i}", (rand(rng, cout, cin // g, *k) / np.sqrt(np.prod(k))).astype(np.float32)))
        ins = ["x", f"W{i}"]
        if spec.pop("bias", True):
            inits.append(init(f"B{i}", rand(rng, cout)))
            ins.append(f"B{i}")
        nodes.append(helper.make_node("Conv", ins, [f"c{i}"], name=f"conv{i}", **spec))
        if bn:
            inits += bn_initializers(rng, f"bn{i}", cout)
            nodes.append(bn_node(f"bn{i}", f"c{i}", f"t{i}"))
        terms.append(f"t{i}" if bn else f"c{i}")
    if identity == "plain":
        terms.append("x")
    elif identity == "bn":
        inits += bn_initializers(rng, "idbn", cout)
        nodes.append(bn_node("idbn", "x", "tid"))
        terms.append("tid")
    out = "s" if bn_after else "y"
    if op == "Sum":
        nodes.append(helper.make_node("Sum", terms, [out], name="sum"))
    else:
        acc = terms[0]
        for i, t in enumerate(terms[1:]):
            name = out if i == len(terms) - 2 else f"s{i}"
            nodes.append(helper.make_node("Add", [acc, t], [name], name=f"add{i}"))
            acc = name
    if bn_after:
        inits += bn_initializers(rng, "bnafter", cout)
        nodes.append(bn_node("bnafter", "s", "y"))
    return make_model(nodes, {"x": (2, cin, *hw)}, ["y", *extra_outputs], inits)


def merge_onnx(model: onnx.ModelProto, passes=("merge_reparam",)):
    before = model.SerializeToString()
    out, report = lkfx.transform(model, list(passes), return_report=True)
    assert model.SerializeToString() == before, "transform(inplace=False) modified the input ModelProto"
    onnx.checker.check_model(out, full_check=True)
    assert [(o.domain, o.version) for o in out.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    return out, report["merge_reparam"]


def check_merged(model, n: int = 1, convs: int = 1):
    out, pr = merge_onnx(model)
    assert (pr.matched, pr.rewritten, pr.skipped) == (n, n, []), (pr.skipped, pr.notes)
    ops = op_types(out)
    assert ops.count("Conv") == convs and "BatchNormalization" not in ops, ops
    assert_onnx_same(model, out)
    return out, pr


def check_refused(model, reason: str):
    out, pr = merge_onnx(model)
    assert pr.rewritten == 0 and pr.skipped
    assert all(reason in r for r in reasons(pr)), reasons(pr)
    assert op_types(out) == op_types(model)
    assert_onnx_same(model, out)


def conv_attrs(model: onnx.ModelProto, index: int = 0) -> dict:
    node = [n for n in model.graph.node if n.op_type == "Conv"][index]
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


# --- merges ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op", ["Add", "Sum"])
def test_small_plus_large(op):
    model = branches_model(4, 6, [{"k": 7, "pads": [3] * 4}, {"k": 3, "pads": [1] * 4, "bias": False}, {"k": 1}],
                           op=op)
    out, pr = check_merged(model)
    assert op_types(out) == ["Conv"]
    assert conv_attrs(out)["kernel_shape"] == [7, 7] and conv_attrs(out)["pads"] == [3, 3, 3, 3]
    assert pr.notes[0].startswith("merged conv0, conv1, conv2 into")


def test_depthwise_with_dilated_branches():
    specs = [{"k": 13, "pads": [6] * 4}] + [{"k": k, "dilations": [d, d], "pads": [d * (k - 1) // 2] * 4}
                                           for k, d in ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5))]
    model = branches_model(8, 8, [dict(s, group=8) for s in specs], hw=(16, 15))
    out, _ = check_merged(model)
    assert conv_attrs(out)["kernel_shape"] == [13, 13] and conv_attrs(out)["dilations"] == [1, 1]


@pytest.mark.parametrize("identity", ["plain", "bn"])
@pytest.mark.parametrize("group", [1, 4])
def test_identity_branch(identity, group):
    model = branches_model(4, 4, [{"k": 3, "pads": [1] * 4, "group": group}, {"k": 1, "group": group}],
                           identity=identity)
    check_merged(model)


def test_bn_after_the_sum():
    model = branches_model(6, 6, [{"k": 3, "pads": [1] * 4, "group": 6}, {"k": 1, "group": 6}], identity="plain",
                           bn=False, bn_after=True)
    _, pr = check_merged(model)
    assert "and bnafter" in pr.notes[0]


@pytest.mark.parametrize("hw", [(8, 8), (9, 7)])
def test_stride_2(hw):
    model = branches_model(4, 8, [{"k": 3, "pads": [1] * 4, "strides": [2, 2]}, {"k": 1, "strides": [2, 2]}], hw=hw)
    check_merged(model)


def test_asymmetric_explicit_pads():
    """ONNX begin/end pads: 2x2 (0, 0 | 1, 1) + 4x4 (1, 1 | 2, 2) + 3x3 (1 | 1) -> 4x4 with pads (1, 1 | 2, 2)."""
    model = branches_model(4, 4, [{"k": 2, "pads": [0, 0, 1, 1]}, {"k": 4, "pads": [1, 1, 2, 2]},
                                  {"k": 3, "pads": [1, 1, 1, 1]}])
    out, _ = check_merged(model)
    assert conv_attrs(out)["kernel_shape"] == [4, 4] and conv_attrs(out)["pads"] == [1, 1, 2, 2]


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
def test_auto_pad_same_even_kernels(auto_pad):
    model = branches_model(4, 4, [{"k": 2, "auto_pad": auto_pad}, {"k": 4, "auto_pad": auto_pad},
                                  {"k": 3, "auto_pad": auto_pad}], hw=(7, 6))
    check_merged(model)


def test_kernels_larger_than_the_feature_map():
    check_merged(branches_model(4, 4, [{"k": 11, "pads": [5] * 4}, {"k": 7, "pads": [3] * 4}], hw=(5, 4)))


@pytest.mark.parametrize("hw", [(13,), (6, 5, 7)])
def test_other_ranks(hw):
    nd = len(hw)
    specs = [{"k": 5, "pads": [2] * 2 * nd}, {"k": 3, "pads": [2] * 2 * nd, "dilations": [2] * nd}, {"k": 1}]
    check_merged(branches_model(3, 5, specs, hw=hw))


def test_linear_combination_with_constants():
    """x + ls * (conv_bn(x) - bn(x)) + 0.5 - small(x): FastViT's RepMixer form plus a scalar and a Neg."""
    rng = np.random.default_rng(3)
    c = 6
    inits = [init("Wm", rand(rng, c, 1, 3, 3)), init("Ws", rand(rng, c, 1, 1, 1)), init("Bs", rand(rng, c)),
             init("ls", (rng.random((c, 1, 1)) + 0.5).astype(np.float32)), init("half", np.float32(0.5)),
             *bn_initializers(rng, "mbn", c), *bn_initializers(rng, "norm", c)]
    nodes = [helper.make_node("Conv", ["x", "Wm"], ["m"], name="mixer", group=c, pads=[1] * 4),
             bn_node("mbn", "m", "mb"), bn_node("norm", "x", "n"),
             helper.make_node("Sub", ["mb", "n"], ["d"], name="sub"),
             helper.make_node("Mul", ["ls", "d"], ["scaled"], name="mul"),
             helper.make_node("Add", ["x", "scaled"], ["r"], name="residual"),
             helper.make_node("Add", ["half", "r"], ["h"], name="plus_half"),
             helper.make_node("Conv", ["x", "Ws", "Bs"], ["sm"], name="small", group=c),
             helper.make_node("Neg", ["sm"], ["neg"], name="neg"),
             helper.make_node("Add", ["h", "neg"], ["y"], name="out")]
    model = make_model(nodes, {"x": (2, c, 8, 8)}, ["y"], inits)
    out, _ = check_merged(model)
    assert op_types(out) == ["Conv"]


def test_merged_group_plus_other_terms():
    """The terms that are no branches of x are added back to the merged conv, with their factors."""
    model = branches_model(4, 4, [{"k": 3, "pads": [1] * 4}, {"k": 1}])
    g = model.graph
    g.input.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2, 4, 9, 8]))
    g.initializer.append(init("two", np.float32(2.0)))
    g.node[-1].output[0] = "sum"
    g.node.extend([helper.make_node("Mul", ["z", "two"], ["z2"], name="scale_z"),
                   helper.make_node("Sub", ["sum", "z2"], ["y"], name="minus_z")])
    out, _ = check_merged(model)
    assert sorted(op_types(out)) == ["Add", "Conv", "Mul", "Neg"]


def test_exported_train_form_torch_block():
    """A torch block exported in train form (BN kept) merges to one Conv."""
    torch.manual_seed(0)
    from lkfx.modules.replk import ReparamLargeKernelConv

    block = randomize_bn(ReparamLargeKernelConv(8, 9, dilated=True)).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(block, (torch.randn(1, 8, 12, 12),), buf, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17)
    model = onnx.load_from_string(buf.getvalue())
    assert op_types(model).count("BatchNormalization") == 5
    out, _ = check_merged(model)
    assert op_types(out) == ["Conv"] and conv_attrs(out)["kernel_shape"] == [9, 9]


# --- refusals -------------------------------------------------------------------------------------------------
def test_refuses_different_strides():
    check_refused(branches_model(4, 4, [{"k": 1, "strides": [2, 2]}, {"k": 5}], hw=(8, 8)), "differ in stride")


def test_refuses_different_groups():
    check_refused(branches_model(4, 4, [{"k": 3, "pads": [1] * 4, "group": 2}, {"k": 1}]), "differ in groups")


def test_refuses_auto_pad_same_with_stride_2():
    model = branches_model(4, 4, [{"k": 3, "auto_pad": "SAME_UPPER", "strides": [2, 2]},
                                  {"k": 1, "strides": [2, 2]}], hw=(8, 8))
    check_refused(model, "pads depend on the input size")


def test_refuses_dilation_that_changes_the_output_size():
    model = branches_model(4, 4, [{"k": 3, "dilations": [2, 2], "pads": [1] * 4, "strides": [2, 2]},
                                  {"k": 2, "strides": [2, 2]}], hw=(9, 9))
    check_refused(model, "different output sizes")


def test_refuses_training_mode_bn():
    model = branches_model(4, 4, [{"k": 3, "pads": [1] * 4}, {"k": 1}], identity="bn")
    for node in model.graph.node:
        if node.name == "idbn":
            node.attribute.append(helper.make_attribute("training_mode", 1))
            node.output.extend(["m_out", "v_out"])
    out, pr = merge_onnx(model)
    assert pr.rewritten == 0 and "training_mode=1" in reasons(pr)[0]


def test_refuses_branch_output_used_elsewhere():
    model = branches_model(4, 4, [{"k": 3, "pads": [1] * 4}, {"k": 1}], extra_outputs=("t0",))
    check_refused(model, "t0 is also read by")


def test_identity_that_is_itself_a_conv_output():
    """After fold_bn the shared input is often a Conv's output: it joins as an identity, not as a branch."""
    model = branches_model(4, 4, [{"k": 3, "pads": [1] * 4}, {"k": 1}], identity="plain", bn=False)
    g = model.graph
    g.initializer.append(init("W_first", rand(np.random.default_rng(9), 4, 4, 1, 1)))
    for node in g.node:
        node.input[:] = ["x0" if i == "x" else i for i in node.input]
    g.node.insert(0, helper.make_node("Conv", ["x", "W_first"], ["x0"], name="first"))
    out, pr = check_merged(model, convs=2)
    assert pr.notes == ["merged conv0, conv1, identity first into conv0_reparam_conv (3x3)"]
