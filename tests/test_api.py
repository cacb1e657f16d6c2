"""The public contract of lkfx.transform / list_passes / register_pass / Report (design.md)."""

import copy
import json
import subprocess
import sys

import onnx
import pytest
import torch
import torch.nn as nn
from onnx_models import conv_bn_chain, count

import lkfx
from lkfx import CheckError, LkfxError, Pass, PassError, register_pass


def small_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.running_mean, -1, 1)
            nn.init.uniform_(m.running_var, 0.5, 2)
            nn.init.uniform_(m.weight, 0.5, 2)
            nn.init.uniform_(m.bias, -1, 1)
    return net.eval()


def test_module_in_module_out_and_original_untouched():
    net = small_net()
    state = copy.deepcopy(net.state_dict())
    x = torch.randn(2, 3, 16, 16)
    out, report = lkfx.transform(net, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    assert isinstance(out, nn.Module) and out is not net
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert report["fold_bn"].rewritten == 2 and report.modified and report.check["passed"]
    assert not out.training
    torch.testing.assert_close(out(x), net(x), rtol=1e-5, atol=1e-5)


def test_inplace_module_may_change_the_callers_weights():
    net = small_net()
    conv = net[0]
    before = conv.weight.detach().clone()
    lkfx.transform(net, ["fold_bn"], inplace=True)
    assert not torch.equal(conv.weight, before)


def test_onnx_path_and_proto_in_proto_out(tmp_path):
    proto = conv_bn_chain()
    snapshot = proto.SerializeToString()
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    for source in (proto, path, str(path)):
        out = lkfx.transform(source, ["fold_bn"], check=True)
        assert isinstance(out, onnx.ModelProto) and count(out, "BatchNormalization") == 0
    assert proto.SerializeToString() == snapshot
    same = lkfx.transform(proto, ["fold_bn"], inplace=True)
    assert same is proto and count(proto, "BatchNormalization") == 0


def test_onnx_example_inputs_by_name_in_order_or_as_tensors():
    proto = conv_bn_chain(c=4, hw=8)
    x = torch.randn(1, 4, 8, 8)
    for given in (x, x.numpy(), (x,), [x.numpy()], {"x": x.numpy()}):
        _, report = lkfx.transform(proto, ["fold_bn"], example_inputs=given, check=True, return_report=True)
        assert report.check["passed"]
    with pytest.raises(LkfxError, match=r"2 example input\(s\) for a graph with 1 input\(s\) \['x'\]"):
        lkfx.transform(proto, ["fold_bn"], example_inputs=(x, x), check=True)
    with pytest.raises(LkfxError, match=r"\['y'\] are not inputs of the graph; its inputs are \['x'\]"):
        lkfx.transform(proto, ["fold_bn"], example_inputs={"y": x.numpy()}, check=True)


def test_pass_items_names_tuples_objects():
    net, x = small_net(), torch.randn(1, 3, 8, 8)
    cls = type(lkfx.passes.get_pass("fold_bn")())
    for spec in (["fold_bn"], [("fold_bn", {"before": False})], [cls(before=True)], "fold_bn"):
        assert lkfx.transform(net, spec, example_inputs=x, check=True) is not None


@pytest.mark.parametrize("spec,words", [(["nope"], ["unknown pass 'nope'", "fold_bn"]),
                                        ([("fold_bn", {"bogus": 1})], ["no option 'bogus'", "before=True"]),
                                        ([42], ["cannot use 42"]), ([], ["no passes"])])
def test_bad_pass_specs_raise_value_error_listing_valid_ones(spec, words):
    with pytest.raises(ValueError) as e:
        lkfx.transform(small_net(), spec)
    for w in words:
        assert w in str(e.value)


def test_bad_model_kind():
    with pytest.raises(LkfxError, match="nn.Module"):
        lkfx.transform(3.5, ["fold_bn"])


def test_check_on_module_needs_example_inputs():
    with pytest.raises(LkfxError, match="example_inputs"):
        lkfx.transform(small_net(), ["fold_bn"], check=True)


class _Negate(Pass):
    name = "test_negate_output"
    summary = "multiply the output by -1 (wrong on purpose)"

    def run_fx(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out):
            neg = gm.graph.call_function(torch.neg, (out.args[0],))
        out.update_arg(0, neg)
        gm.recompile()
        ctx.report.rewritten += 1
        return gm


class _Crash(Pass):
    name = "test_crash"
    summary = "raises (to test error wrapping)"

    def run_fx(self, gm, ctx):
        raise ZeroDivisionError("boom")


def test_check_raises_on_mismatch():
    register_pass(_Negate)
    with pytest.raises(CheckError, match="max relative error"):
        lkfx.transform(small_net(), ["fold_bn", "test_negate_output"], example_inputs=torch.randn(1, 3, 8, 8),
                       check=True)


def test_failing_pass_is_named():
    register_pass(_Crash)
    with pytest.raises(PassError, match="'test_crash'.*ZeroDivisionError: boom"):
        lkfx.transform(small_net(), ["fold_bn", "test_crash"])


def test_pass_without_a_frontend_is_refused(tmp_path):
    register_pass(_Crash)
    with pytest.raises(LkfxError, match="no onnx frontend"):
        lkfx.transform(conv_bn_chain(), ["test_crash"])


def test_register_pass_validation():
    class NoName(Pass):
        def run_fx(self, gm, ctx):
            return gm

    class NoFrontend(Pass):
        name = "test_nothing"

    with pytest.raises(TypeError):
        register_pass(NoName)
    with pytest.raises(TypeError):
        register_pass(NoFrontend)


def test_list_passes():
    infos = {i["name"]: i for i in lkfx.list_passes()}
    assert infos["fold_bn"]["frontends"] == ["fx", "onnx"]
    assert infos["fold_bn"]["options"] == {"before": True}
    assert infos["fold_bn"]["summary"]


def test_report_table_and_json():
    _, report = lkfx.transform(small_net(), ["fold_bn"], example_inputs=torch.randn(1, 3, 8, 8), check=True,
                               return_report=True)
    text = str(report)
    assert "fold_bn" in text and "matched" in text and "rewritten" in text and "check" in text
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passes"][0]["rewritten"] == 2 and data["modified"] is True


def test_untraceable_model_falls_back_to_submodules():
    class Gate(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # data-dependent control flow

    net = nn.Sequential(small_net(), Gate())
    x = torch.randn(1, 3, 8, 8)
    out, report = lkfx.transform(net, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    assert report["fold_bn"].rewritten == 2
    assert any("cannot trace" in n and "leaf_modules" in n for n in report.notes)


def test_import_lkfx_is_light():
    code = ("import sys, lkfx; lkfx.list_passes(); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'triton', 'tensorrt') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_path_does_not_import_torch(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_bn_chain(), str(path))
    code = (f"import sys, lkfx; lkfx.transform({str(path)!r}, ['fold_bn'], check=True); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _with_initializers_as_inputs(ir_version: int) -> onnx.ModelProto:
    model = conv_bn_chain(n=2)
    model.ir_version = ir_version
    if ir_version < 4:
        del model.opset_import[:]
        model.opset_import.extend([onnx.helper.make_opsetid("", 8)])
    model.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, t.dims)
                             for t in model.graph.initializer)
    return model


def test_old_ir_initializers_as_inputs_fold_and_stay_valid():
    model = _with_initializers_as_inputs(3)
    out = lkfx.transform(model, ["fold_bn"], check=True)
    onnx.checker.check_model(out)
    assert count(out, "BatchNormalization") == 0
    assert {t.name for t in out.graph.initializer} <= {i.name for i in out.graph.input}


def test_overridable_initializers_are_not_folded():
    model = _with_initializers_as_inputs(8)
    out, report = lkfx.transform(model, ["fold_bn"], check=True, return_report=True)
    assert count(out, "BatchNormalization") == 2 and report["fold_bn"].rewritten == 0
    assert all("not constants" in s.reason or "not a constant" in s.reason for s in report["fold_bn"].skipped)
    assert {i.name for i in out.graph.input} == {i.name for i in model.graph.input}
