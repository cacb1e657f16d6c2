"""fake_quant options on both frontends: method aliases, per_channel, exclude, batch_size, qat on ONNX refused,
the placement note, and fallback=auto on a deliberately bad case (an outlier channel that ruins minmax)."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from helpers import op_types

import lkfx
from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import FakeQuant, WeightFakeQuant
from lkfx.quant.data import load_calib_data


class OutlierNet(nn.Module):
    """conv1 -> ReLU -> conv2 -> ReLU -> pool -> linear. With `outlier`, channel 0 of conv1's output sits at 1000
    and conv2 ignores it: the float model does not care, a minmax range on conv2's input is ruined."""

    def __init__(self, outlier: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        if outlier:
            with torch.no_grad():
                self.conv1.weight[0] = 0
                self.conv1.bias[0] = 1000.0
                self.conv2.weight[:, 0] = 0

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def batches(n=4):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(n)]


def to_onnx(model: nn.Module, path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(1, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}})
    return str(path)


def calib_np():
    return [b.numpy() for b in batches()]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_aliases_entropy_and_max():
    model = OutlierNet(False).eval()
    for alias, method in (("entropy", "kl"), ("max", "minmax")):
        a, b = (lkfx.transform(model, [("fake_quant", {"method": m})], calib_data=batches()) for m in (alias, method))
        ra = [m.hi.item() for m in a.modules() if isinstance(m, FakeQuant)]
        assert ra == [m.hi.item() for m in b.modules() if isinstance(m, FakeQuant)]
    listed = next(p for p in lkfx.list_passes() if p["name"] == "fake_quant")["summary"]
    assert "entropy" in listed and "max" in listed


def test_per_channel_false_on_both_frontends(tmp_path):
    model = OutlierNet(False).eval()
    q = lkfx.transform(model, [("fake_quant", {"per_channel": False})], calib_data=batches())
    assert {m.axis for m in q.modules() if isinstance(m, WeightFakeQuant)} == {None}
    assert rel_error(q(batches()[0]), model(batches()[0])) < 0.1
    m = lkfx.transform(to_onnx(model, tmp_path / "m.onnx"), [("fake_quant", {"per_channel": False})],
                       calib_data=calib_np())
    inits = {i.name: i for i in m.graph.initializer}
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and inits[n.input[0]].data_type == onnx.TensorProto.INT8]
    assert weight_dq and all(not inits[n.input[1]].dims for n in weight_dq)  # one scale per tensor
    assert all(not any(a.name == "axis" for a in n.attribute) for n in weight_dq)


def test_exclude_by_name_and_op_type(tmp_path):
    model = OutlierNet(False).eval()
    q, rep = lkfx.transform(model, [("fake_quant", {"exclude": "conv2"})], calib_data=batches(), return_report=True)
    assert sum(isinstance(m, WeightFakeQuant) for m in q.modules()) == 2  # conv1, fc
    assert any(s.where == "conv2" and "excluded" in s.reason for s in rep.passes[0].skipped)
    q = lkfx.transform(model, [("fake_quant", {"exclude": ["Conv"]})], calib_data=batches())
    assert sum(isinstance(m, WeightFakeQuant) for m in q.modules()) == 1  # fc only
    with pytest.raises(LkfxError, match="names no node"):
        lkfx.transform(model, [("fake_quant", {"exclude": "conv9"})], calib_data=batches())

    path = to_onnx(model, tmp_path / "m.onnx")
    conv_names = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"]
    out, rep = lkfx.transform(path, [("fake_quant", {"exclude": conv_names[1]})], calib_data=calib_np(),
                              return_report=True)
    readers = {n.name: n for n in out.graph.node}
    assert not readers[conv_names[1]].input[1].endswith("_dq")  # its weight stays float
    assert readers[conv_names[0]].input[1].endswith("_dq")
    assert any("excluded" in s.reason for s in rep.passes[0].skipped)
    out = lkfx.transform(path, [("fake_quant", {"exclude": "Conv;Gemm"})], calib_data=calib_np())
    assert "QuantizeLinear" not in op_types(out)
    with pytest.raises(LkfxError, match="neither a node name nor an op type"):
        lkfx.transform(path, [("fake_quant", {"exclude": "conv9"})], calib_data=calib_np())


def test_batch_size_does_not_depend_on_key_names(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32)
    spec = {"x": ((None, 3, 8, 8), np.dtype(np.float32))}
    np.savez(tmp_path / "named.npz", x=x)
    np.savez(tmp_path / "anon.npz", x[:25], x[25:])
    for source in ("named.npz", "anon.npz"):
        got = load_calib_data(str(tmp_path / source), spec, batch_size=16)
        assert [b["x"].shape[0] for b in got] == [16, 16, 8]
        assert np.array_equal(np.concatenate([b["x"] for b in got]), x)
    assert len(load_calib_data(str(tmp_path / "anon.npz"), spec)) == 2  # without it: one batch per array
    assert len(load_calib_data(str(tmp_path / "anon.npz"), spec, batch_size=16, num_batches=2)) == 2
    with pytest.raises(LkfxError, match="fixed at 4"):
        load_calib_data(x, {"x": ((4, 3, 8, 8), np.dtype(np.float32))}, batch_size=16)
    model = OutlierNet(False).eval()  # torch: the same option re-cuts the given batches
    q = lkfx.transform(model, [("fake_quant", {"batch_size": 5, "num_batches": 2, "method": "minmax"})],
                       calib_data=batches())
    first = batches()[0]
    assert next(m for m in q.modules() if isinstance(m, FakeQuant)).hi.item() == pytest.approx(first[:10].max())


def test_qat_refused_on_onnx_and_placement_note(tmp_path):
    path = to_onnx(OutlierNet(False), tmp_path / "m.onnx")
    with pytest.raises(LkfxError, match="qat=true is for torch models"):
        lkfx.transform(path, [("fake_quant", {"qat": True})], calib_data=calib_np())
    _, rep = lkfx.transform(path, ["fake_quant"], calib_data=calib_np(), return_report=True)
    assert any("placement=tensorrt" in n and "placement=ort" in n for n in rep.passes[0].notes)
    _, rep = lkfx.transform(OutlierNet(False).eval(), [("fake_quant", {"placement": "ort"})], calib_data=batches(),
                            return_report=True)
    assert any(n.startswith("placement=ort: ") for n in rep.passes[0].notes)


def test_fallback_auto_recovers_an_outlier_layer_torch():
    model = OutlierNet(True).eval()
    x = torch.cat(batches())
    bad = lkfx.transform(model, [("fake_quant", {"method": "minmax"})], calib_data=batches())
    assert rel_error(bad(x), model(x)) > 0.2
    q, rep = lkfx.transform(model, [("fake_quant", {"method": "minmax", "fallback": "auto", "fallback_bound": 0.05})],
                            calib_data=batches(), return_report=True)
    assert rel_error(q(x), model(x)) <= 0.05
    kept = [s.where for s in rep.passes[0].skipped if "fallback=auto" in s.reason]
    assert kept == ["conv2"]
    assert any("1 layer(s) kept in float: conv2" in n for n in rep.passes[0].notes)
    good, rep = lkfx.transform(OutlierNet(False).eval(), [("fake_quant", {"fallback": "auto"})],
                               calib_data=batches(), return_report=True)
    assert any("every layer quantized" in n for n in rep.passes[0].notes)


def test_fallback_auto_recovers_an_outlier_layer_onnx(tmp_path):
    import onnxruntime as ort

    model = OutlierNet(True).eval()
    path = to_onnx(model, tmp_path / "m.onnx")
    x = torch.cat(batches())
    ref = model(x).detach().numpy()

    def err(m):
        sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x.numpy()})[0]
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))

    assert err(lkfx.transform(path, [("fake_quant", {"method": "minmax"})], calib_data=calib_np())) > 0.2
    conv2 = [n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"][1]
    for placement in ("tensorrt", "ort"):
        m, rep = lkfx.transform(path, [("fake_quant", {"method": "minmax", "fallback": "auto", "placement": placement,
                                                       "fallback_bound": 0.05})],
                                calib_data=calib_np(), return_report=True)
        assert err(m) <= 0.05
        assert [s.where for s in rep.passes[0].skipped if "fallback=auto" in s.reason] == [conv2]


def test_fallback_bad_values():
    with pytest.raises(LkfxError, match="fallback must be"):
        lkfx.transform(OutlierNet(False).eval(), [("fake_quant", {"fallback": "yes"})], calib_data=batches())
    with pytest.raises(LkfxError, match="calib_data"):
        lkfx.transform(OutlierNet(False).eval(), [("fake_quant", {"fallback": "auto"})])
