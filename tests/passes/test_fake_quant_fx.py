"""fake_quant on torch.fx: where quantizers go (TensorRT / ORT placement, module and functional graphs), QAT,
training through the fake-quant ops, export to QDQ that onnxruntime runs with int8 kernels."""

from __future__ import annotations

import operator
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import ORT_INT8_WEIGHT_BITS, randomize_bn

import lkfx
from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import ConvBnFakeQuant, FakeQuant, WeightFakeQuant
from lkfx.quant import export_onnx, freeze_bn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from quantize_digits import cnn  # noqa: E402


def digits_cnn():
    torch.manual_seed(0)
    return randomize_bn(cnn()).eval()


def calib(n=3, shape=(16, 1, 8, 8)):
    gen = torch.Generator().manual_seed(1)
    return [torch.rand(shape, generator=gen) for _ in range(n)]


def quantizers(gm, kind):
    """Names of the nodes that call a module of type `kind`, and what they read."""
    return {n.name: n.args[0].name for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), kind)}


def test_tensorrt_placement_on_the_digits_cnn():
    model = digits_cnn()
    q, report = lkfx.transform(model, ["fake_quant"], return_report=True)
    rep = report.passes[0]
    assert rep.matched == rep.rewritten == 5 + 5 and not rep.skipped
    assert any("4 BatchNorm(s) folded" in n for n in rep.notes)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert len(quantizers(q, WeightFakeQuant)) == 5  # four convs and the linear
    acts = quantizers(q, FakeQuant)
    # graph input, stem output (dw input + residual skip), dw output (pw input), add output (strided conv input),
    # pooled features (linear input); the pw output stays float (TensorRT fuses pw conv + add)
    assert sorted(acts.values()) == sorted(["x", "stem_2", "relu", "relu_1", "flatten"])
    add = next(n for n in q.graph.nodes if n.target is operator.add)
    assert [a.op for a in add.args] == ["call_module", "call_function"]  # the skip quantized, the conv side float
    assert add.args[0].args[0].name == "stem_2" and add.args[1].name == "conv2d_2"
    convs = [n for n in q.graph.nodes if n.target in (torch.conv2d, F.linear)]
    assert len(convs) == 5 and all(n.args[0].name in acts and n.args[1].name in quantizers(q, WeightFakeQuant)
                                   for n in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4  # the input model is untouched


def test_ort_placement_quantizes_outputs_after_their_relu():
    q = lkfx.transform(digits_cnn(), [("fake_quant", {"placement": "ort"})])
    acts = set(quantizers(q, FakeQuant).values())
    assert {"x", "stem_2", "relu", "conv2d_2", "relu_1", "down_2", "flatten", "linear"} == acts  # ReLU outputs
    assert "conv2d" not in acts and "conv2d_3" not in acts  # not between a conv and its ReLU


def resnet_blocks(stem: bool) -> nn.Module:
    """torchvision's BasicBlock with an identity shortcut, then (with a stem) a downsample block (convs on both
    sides)."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    down = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()] if stem else []
    layers += [BasicBlock(8, 8), BasicBlock(8, 16, stride=2, downsample=down)] if stem else [BasicBlock(8, 8)]
    return randomize_bn(nn.Sequential(*layers)).eval()


def fx_add_inputs(gm: torch.fx.GraphModule) -> list[list[tuple[bool, tuple]]]:
    """Per add, in graph order: (quantized, kernel size of the conv computing it or ()) for each input."""
    def describe(a):
        quantized = a.op == "call_module" and isinstance(gm.get_submodule(a.target), FakeQuant)
        src = a.args[0] if quantized else a
        if src.target is not torch.conv2d:
            return quantized, ()
        w = src.args[1].args[0]  # WeightFakeQuant(get_attr)
        return quantized, tuple(gm.get_parameter(w.target).shape[2:])

    return [sorted(describe(a) for a in n.args[:2]) for n in gm.graph.nodes if n.target is operator.add]


def onnx_add_inputs(model: onnx.ModelProto) -> list[list[tuple[bool, tuple]]]:
    """The same description of an ONNX model's Adds (QuantizeLinear -> DequantizeLinear marks a quantized input)."""
    producers = {o: n for n in model.graph.node for o in n.output}

    def describe(name):
        node = producers.get(name)
        quantized = node is not None and node.op_type == "DequantizeLinear"
        if quantized:
            node = producers.get(producers[node.input[0]].input[0])
        if node is None or node.op_type != "Conv":
            return quantized, ()
        return quantized, tuple(next(a.ints for a in node.attribute if a.name == "kernel_shape"))

    return [sorted(describe(i) for i in n.input) for n in model.graph.node if n.op_type == "Add"]


@pytest.mark.parametrize("stem", [False, True], ids=["identity-block-on-the-input", "stem-identity-downsample"])
def test_tensorrt_residual_placement_is_the_same_on_fx_and_onnx(tmp_path, stem):
    """ModelOpt's rule on both frontends: the add input straight from a conv stays float (TensorRT fuses conv + add),
    the shortcut is quantized; in the downsample block (convs on both sides) the 1x1 downsample conv's output."""
    model, x = resnet_blocks(stem), torch.rand(2, 3 if stem else 8, 8, 8)
    options = {"placement": "tensorrt", "method": "minmax"}
    q = lkfx.transform(model, [("fake_quant", options)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    onnx_q = lkfx.transform(onnx.load(str(tmp_path / "m.onnx")), [("fake_quant", options)], calib_data=[x.numpy()])
    fx_adds = fx_add_inputs(q)
    assert fx_adds == onnx_add_inputs(onnx_q)
    expected = [[(False, (3, 3)), (True, ())]] + ([[(False, (3, 3)), (True, (1, 1))]] if stem else [])
    assert fx_adds == expected


class Residuals(nn.Module):
    """The graph of the ONNX residual-rule test: convs on both sides, conv + skip, a conv plus its own sigmoid."""

    def __init__(self):
        super().__init__()
        self.stem, self.main1, self.main2, self.down = (nn.Conv2d(4, 4, 1) for _ in range(4))

    def forward(self, x):
        r = F.relu(self.stem(x))
        c2, c3 = self.main2(F.relu(self.main1(r))), self.down(r)
        return ((c2 + c3) + (c2 + r)) + (c3 + torch.sigmoid(c3))


def test_tensorrt_residual_rule_on_fx_matches_onnx(tmp_path):
    torch.manual_seed(0)
    model, x = Residuals().eval(), torch.rand(2, 4, 3, 3)
    options = {"placement": "tensorrt", "method": "minmax"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, opset_version=17, input_names=["x"])
    onnx_q = lkfx.transform(onnx.load(str(tmp_path / "m.onnx")), [("fake_quant", options)], calib_data=[x.numpy()])
    fx_adds = fx_add_inputs(lkfx.transform(model, [("fake_quant", options)]))
    assert sorted(fx_adds) == sorted(onnx_add_inputs(onnx_q))
    conv, skip, other = (False, (1, 1)), (True, ()), (False, ())
    # c2 + c3: the shorter (down) side; c2 + r: r; (sum of adds); c3 + sigmoid(c3): no residual; the sum
    assert fx_adds == [[conv, (True, (1, 1))], [conv, skip], [other, other], [other, conv], [other, other]]


class Functional(nn.Module):
    """F.* convs on plain parameters, a matmul, torch.add with a residual, a reflect-padded conv module."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.proj = nn.Parameter(torch.randn(8, 8) * 0.3)
        self.pad = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.w1, padding=1))
        y = F.conv2d(x, self.w2, padding=1, groups=8)
        x = torch.add(x, y)
        x = self.pad(x)
        return torch.matmul(x.mean((2, 3)), self.proj)


def test_functional_graph_and_padding_mode():
    torch.manual_seed(0)
    model = Functional()
    data = calib(shape=(4, 3, 8, 8))
    q, report = lkfx.transform(model, ["fake_quant"], calib_data=data, return_report=True)
    assert len(quantizers(q, WeightFakeQuant)) == 3  # w1, w2 and the padded module's weight
    acts = quantizers(q, FakeQuant)
    # x, relu (conv + the add's skip), the padded add (pad conv), mean (matmul); conv2d_1 -> add stays float
    assert sorted(acts.values()) == ["mean", "pad_1", "relu", "x"]
    assert any(n.target is F.pad for n in q.graph.nodes)
    with torch.no_grad():
        ref, out = model(data[0]), q(data[0])
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert set(dict(q.named_parameters())) == set(dict(model.named_parameters()))  # same parameter names


def test_conv_transpose_per_output_channel():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 2, stride=2),
                          nn.ReLU(), nn.ConvTranspose2d(4, 4, 3, padding=1, groups=2)).eval()
    data = calib(shape=(4, 3, 8, 8))
    q, report = lkfx.transform(model, ["fake_quant"], calib_data=data, return_report=True)
    assert [s.reason for s in report.passes[0].skipped] == \
        ["grouped ConvTranspose: output channels are not one weight axis"]
    up = q.get_submodule(next(n for n in quantizers(q, WeightFakeQuant) if n.startswith("_2")))
    assert up.axis == 1  # ConvTranspose weights are (in, out, k, k)
    assert len(quantizers(q, FakeQuant)) == 3  # inputs of the conv and of both transposed convs
    with torch.no_grad():
        ref, out = model(data[0]), q(data[0])
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_weight_bits_four_and_per_channel_depthwise():
    q = lkfx.transform(digits_cnn(), [("fake_quant", {"weight_bits": 4})])
    dw = next(m for n, m in q.named_modules() if n.startswith("dw_weight"))
    w = dw(q.dw.weight).detach()
    assert dw.bits == 4 and w.shape[0] == 32
    for c in range(32):
        assert len(torch.unique(w[c])) <= 15
    steps = {float(torch.unique(w[c].abs())[1]) for c in range(32) if len(torch.unique(w[c].abs())) > 1}
    assert len(steps) > 16  # depthwise channels each have their own scale


def test_uncalibrated_model_says_what_to_do():
    q = lkfx.transform(digits_cnn(), ["fake_quant"])
    with pytest.raises(LkfxError, match="lkfx.calibrate"):
        q(calib()[0])


@pytest.mark.parametrize(("option", "value", "match"), [
    ("placement", "trt", "placement must be one of tensorrt, ort"),
    ("weight_bits", 9, "weight_bits"),
    ("method", "entropie", "valid methods"),
    ("search_step", 0, "search_step"),
])
def test_bad_options(option, value, match):
    with pytest.raises(LkfxError, match=match):
        lkfx.transform(digits_cnn(), [("fake_quant", {option: value})])


def test_qat_fuses_conv_bn_and_trains():
    torch.manual_seed(0)
    model = cnn().train()
    q, report = lkfx.transform(model, [("fake_quant", {"qat": True})], return_report=True)
    fused = [m for m in q.modules() if isinstance(m, ConvBnFakeQuant)]
    assert len(fused) == 4 and len(quantizers(q, WeightFakeQuant)) == 1  # the linear
    assert q.training
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(q.parameters(), lr=1e-2)
    losses = []
    for step in range(6):
        if step == 3:
            assert freeze_bn(q) == 4
        opt.zero_grad()
        loss = F.cross_entropy(q(x), y)
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in q.parameters())  # STE reaches all
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    acts = [m for m in q.modules() if isinstance(m, FakeQuant)]
    assert all(m.calibrated for m in acts)  # training set the moving-average ranges
    q.eval()
    with torch.no_grad():
        assert torch.isfinite(q(x)).all()


class SharedConvBn(nn.Module):
    """The same conv + BN applied twice, and a conv whose output is also read by the residual add."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        x = self.bn(self.conv(self.bn(self.conv(x))))
        y = self.conv2(x)
        return self.bn2(y) + y


def test_qat_refuses_shared_and_multi_use_pairs():
    q, report = lkfx.transform(SharedConvBn().train(), [("fake_quant", {"qat": True})], return_report=True)
    reasons = sorted(s.reason for s in report.passes[0].skipped)
    assert len(reasons) == 3 and not any(isinstance(m, ConvBnFakeQuant) for m in q.modules())
    assert "called 2 times" in reasons[0] and "called 2 times" in reasons[1]
    assert "also used by add" in reasons[2]
    q(torch.randn(2, 3, 6, 6)).sum().backward()  # still trains: the refused convs quantize their weights alone
    assert q.conv.weight.grad is not None


@pytest.mark.parametrize("placement", ["ort", "tensorrt"])
def test_export_runs_int8_in_onnxruntime(tmp_path, placement):
    options = {"placement": placement, "method": "minmax", "weight_bits": ORT_INT8_WEIGHT_BITS}
    q = lkfx.transform(digits_cnn(), [("fake_quant", options)], calib_data=calib())
    path = tmp_path / "q.onnx"
    proto = export_onnx(q, calib()[0][:1], path)
    ops = [n.op_type for n in proto.graph.node]
    acts = len(quantizers(q, FakeQuant))  # 5 (tensorrt) or 8 (ort), and 5 weights
    assert ops.count("QuantizeLinear") >= acts + 5 and ops.count("DequantizeLinear") >= acts + 5
    assert "Mul" not in ops and "ReduceMax" not in ops  # weight scales folded into constants
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "q.opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    optimised = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    # tensorrt: onnxruntime needs a quantized output for QLinearConv: the stem and dw convs (their outputs feed
    # quantized conv inputs); the pw conv feeds the add in float (TensorRT would fuse it), the strided conv the pool
    assert optimised.count("QLinearConv") >= (4 if placement == "ort" else 2), optimised
    x = torch.rand(32, 1, 8, 8)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    if placement == "ort":  # the logits are quantized: within one step of the output quantizer
        logits = next(n for n in q.graph.nodes if n.op == "output").args[0]
        step = q.get_submodule(logits.target).scale.item()
        assert np.abs(out - ref).max() <= step * 1.01
    else:
        assert np.abs(out - ref).max() <= 0.02 * np.abs(ref).max()


def test_export_of_narrow_grids_matches_in_onnxruntime(tmp_path):
    """4-bit weights and symmetric 4-bit activations export as Clip -> int8 QDQ: the same values in onnxruntime."""
    options = {"placement": "ort", "method": "minmax", "weight_bits": 4, "act_bits": 4, "act_symmetric": True}
    q = lkfx.transform(digits_cnn(), [("fake_quant", options)], calib_data=calib())
    proto = export_onnx(q, calib()[0][:1])
    assert "Clip" in [n.op_type for n in proto.graph.node]
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.rand(32, 1, 8, 8)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = q(x).numpy()
    logits = next(n for n in q.graph.nodes if n.op == "output").args[0]
    assert np.abs(out - ref).max() <= q.get_submodule(logits.target).scale.item() * 1.01
    assert len(np.unique(out)) <= 15  # the logits are on the 4-bit grid


@pytest.mark.slow  # ~30 s: torch.export of a real network
def test_resnet18_runs_every_conv_in_int8(tmp_path):
    from zoo_models import build, example_input, get

    model, x = build(get("tv-resnet18")), example_input()
    q = lkfx.transform(model, [("fake_quant", {"placement": "ort"})], calib_data=[x])
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(export_onnx(q, x).SerializeToString(), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    assert ops.count("QLinearConv") == 20 and ops.count("QLinearAdd") == 8 and ops.count("QGemm") == 1
    assert "Conv" not in ops and "FusedConv" not in ops
