"""fake_quant on the ONNX frontend and its calibration data.

* `lkfx.quant.data`: every accepted form of calibration data, and every kind of bad data refused with a clear
  `LkfxError` before any work.
* The pass on the scikit-learn digits CNN of `examples/quantize_digits.py` (trained a few epochs, exported with
  its BatchNorms): BN folded first, int8 weights per output channel, QDQ where the placement says, onnxruntime's
  optimised graph made of integer kernels, and outputs close to the float model on the real digits test set.

Documented bound (real digits test set, 450 images): with the range methods (minmax, ema, percentile, mse) the
int8 model's top-1 agrees with the float model's on >= 97 % of the images and its logits are within 10 % of the
largest float logit (max relative error <= 0.1). The divergence searches (kl, symmetric_kl, js) clip harder by
design and are only required to run and give finite outputs here; their accuracy is measured by
benchmarks/quant.py.
"""

from __future__ import annotations

import itertools
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import (
    ORT_INT8_WEIGHT_BITS,
    bn_initializers,
    bn_node,
    init,
    make_model,
    op_types,
    rand,
    randomize_bn,
    reasons,
)
from onnx import helper, numpy_helper

import lkfx
from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError
from lkfx.quant.data import load_calib_data
from lkfx.quant.observers import METHODS

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from quantize_digits import cnn, data, train  # noqa: E402

RANGE_METHODS = ("minmax", "ema", "percentile", "mse")
F32 = np.dtype(np.float32)


def export_digits(path: Path, epochs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train the digits CNN, export it with BatchNorm kept and a free batch dimension (input 'x', output
    'logits'). Returns (train images, test images, test labels) as numpy arrays."""
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    d = data()
    model = cnn()
    train(model, d, epochs, seed)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (d[0][:1],), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "n"}})
    return d[0].numpy(), d[2].numpy(), d[3].numpy()


def optimized_ops(model: onnx.ModelProto, tmp_path: Path) -> list[str]:
    """Op types of onnxruntime's optimised CPU graph."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return op_types(onnx.load(opts.optimized_model_filepath))


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def quantize(model, calib, **options):
    out, report = lkfx.transform(model, [("fake_quant", options)], calib_data=calib, return_report=True)
    onnx.checker.check_model(out, full_check=True)
    return out, report["fake_quant"]


def initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def nodes(model: onnx.ModelProto, op: str) -> list:
    return [n for n in model.graph.node if n.op_type == op]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "digits.onnx"
    x_train, x_test, y_test = export_digits(path, epochs=4)
    model = onnx.load(str(path))
    calib = [x_train[i:i + 64] for i in range(0, 256, 64)]
    return model, calib, x_test, y_test, run(model, x_test)


# --- calibration data ---------------------------------------------------------------------------------------
SPEC = {"x": ((None, 1, 4, 4), F32)}
FIXED = {"x": ((2, 1, 4, 4), F32)}
TWO = {"a": ((None, 3), F32), "b": ((None, 2), F32)}
TWO_FIXED = {"a": ((2, 3), F32), "b": ((2, 2), F32)}


def samples(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 4, 4)).astype(np.float32)


def test_npz_of_named_arrays_is_cut_into_the_models_fixed_batch(tmp_path):
    np.savez(tmp_path / "c.npz", x=samples(6))
    batches = load_calib_data(tmp_path / "c.npz", FIXED)
    assert [b["x"].shape[0] for b in batches] == [2, 2, 2]
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in batches]), samples(6))
    assert len(load_calib_data(str(tmp_path / "c.npz"), SPEC)) == 1  # free batch dimension: one block, one batch


def test_npz_with_other_names_holds_one_batch_per_array_in_natural_order(tmp_path):
    arrays = [samples(3, seed=i) for i in range(11)]
    np.savez(tmp_path / "c.npz", *arrays)  # arr_0 .. arr_10: arr_2 comes before arr_10
    batches = load_calib_data(tmp_path / "c.npz", SPEC)
    assert len(batches) == 11
    for b, a in zip(batches, arrays, strict=True):
        np.testing.assert_array_equal(b["x"], a)


def test_folder_of_npy(tmp_path):
    named, batches = tmp_path / "named", tmp_path / "batches"
    named.mkdir()
    batches.mkdir()
    np.save(named / "a.npy", np.ones((4, 3), np.float32))
    np.save(named / "b.npy", np.zeros((4, 2), np.float32))
    assert [sorted(b) for b in load_calib_data(named, TWO)] == [["a", "b"]]
    for i in (0, 1, 10):
        np.save(batches / f"batch{i}.npy", samples(2, seed=i))
    got = load_calib_data(batches, SPEC)
    np.testing.assert_array_equal(got[2]["x"], samples(2, seed=10))


def test_python_forms():
    x = samples(4)
    assert load_calib_data({"x": x}, SPEC)[0]["x"] is x
    assert load_calib_data(x, SPEC)[0]["x"] is x
    np.testing.assert_array_equal(load_calib_data(torch.from_numpy(x), SPEC)[0]["x"], x)
    assert len(load_calib_data([x, x[:1], torch.from_numpy(x)], SPEC)) == 3
    pair = (np.ones((5, 3), np.float32), np.ones((5, 2), np.float32))
    assert sorted(load_calib_data([pair, dict(zip("ab", pair, strict=True))], TWO)[1]) == ["a", "b"]


def test_a_generator_is_read_no_further_than_num_batches():
    endless = (samples(2) for _ in itertools.count())
    assert len(load_calib_data(endless, SPEC, num_batches=3)) == 3


BAD = {
    "float64": ({"x": samples(2).astype(np.float64)}, SPEC, 0, "is float64, the model expects float32"),
    "rank": ({"x": np.zeros((2, 16), np.float32)}, SPEC, 0, "expects rank 4"),
    "dimension": ({"x": np.zeros((2, 1, 4, 5), np.float32)}, SPEC, 0, "dimension 3 differs"),
    "missing input": ({"a": np.zeros((2, 3), np.float32)}, TWO, 0, "missing 'b'"),
    "unknown name": ({"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 2), np.float32),
                      "c": np.zeros((2, 2), np.float32)}, TWO, 0, "unknown 'c'"),
    "too few batches": ([samples(2), samples(2)], SPEC, 3, "holds 2 batches, fewer than num_batches=3"),
    "nan": ({"x": np.full((2, 1, 4, 4), np.nan, np.float32)}, SPEC, 0, "NaN"),
    "not a multiple of the fixed batch": ({"x": samples(3)}, FIXED, 0, "fixed at 2"),
    "sample counts": ({"a": np.zeros((2, 3), np.float32), "b": np.zeros((4, 2), np.float32)}, TWO_FIXED, 0,
                      "different numbers of samples"),
    "empty": ({"x": np.zeros((0, 1, 4, 4), np.float32)}, SPEC, 0, "empty"),
    "none": (None, SPEC, 0, "--calib-data"),
    "type": (3.5, SPEC, 0, "cannot read calibration data from a float"),
    "one array for two inputs": (np.zeros((2, 3), np.float32), TWO, 0, "not a single array"),
    "tuple length": ([(np.zeros((2, 3), np.float32),)], TWO, 0, "has 1 arrays, the model has 2 inputs"),
    "negative num_batches": ([samples(2)], SPEC, -1, "num_batches must be"),
    "no batches": ([], SPEC, 0, "holds no batches"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_calibration_data_is_refused_with_the_reason(case):
    source, spec, num_batches, message = BAD[case]
    with pytest.raises(LkfxError, match=message.replace("(", r"\(")):
        load_calib_data(source, spec, num_batches=num_batches)


def test_bad_paths_are_refused(tmp_path):
    with pytest.raises(LkfxError, match="does not exist"):
        load_calib_data(tmp_path / "nope.npz", SPEC)
    (tmp_path / "c.txt").write_text("1 2 3")
    with pytest.raises(LkfxError, match="neither a .npz file nor a folder"):
        load_calib_data(tmp_path / "c.txt", SPEC)
    with pytest.raises(LkfxError, match="has no .npy files"):
        load_calib_data(tmp_path, SPEC)
    np.save(tmp_path / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(LkfxError, match="cannot read calibration data"):  # pickles are never loaded
        load_calib_data(tmp_path, SPEC)


# --- the pass on the digits CNN -----------------------------------------------------------------------------
def test_ort_placement_becomes_integer_kernels_in_onnxruntime(digits, tmp_path):
    model, calib, *_ = digits
    out, pr = quantize(model, calib, placement="ort", method="minmax")
    assert (pr.matched, pr.rewritten, pr.skipped) == (5, 5, [])  # 4 convs + the linear head
    assert any("fold_bn folded 4 BatchNormalization" in n for n in pr.notes)
    assert "BatchNormalization" not in op_types(out)
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == 4 and "QGemm" in ops and "QLinearAdd" in ops, ops
    assert "Conv" not in ops and "Gemm" not in ops
    float_bytes = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    int8_bytes = sum(a.nbytes for a in initializers(out).values())
    assert int8_bytes < 0.35 * float_bytes


def test_tensorrt_placement_quantizes_layer_inputs_and_the_residual_skip(digits, tmp_path):
    model, calib, *_ = digits
    out, pr = quantize(model, calib, method="minmax", placement="tensorrt")
    assert pr.rewritten == 5
    producers = {o: n for n in out.graph.node for o in n.output}
    for node in out.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert all(producers[i].op_type == "DequantizeLinear" for i in node.input[:2]), node.name
    add = nodes(out, "Add")[0]
    assert sorted(producers[i].op_type for i in add.input) == ["Conv", "DequantizeLinear"]
    # x, the stem output (read by the depthwise conv and the skip), the pointwise conv, the strided conv, the head
    assert len(nodes(out, "QuantizeLinear")) == 5
    assert "QLinearConv" in optimized_ops(out, tmp_path)


def test_tensorrt_residual_rule_quantizes_the_shortcut_only():
    """ModelOpt's rule: the Add input coming straight from a conv is left float (TensorRT fuses conv + add), the
    shortcut is quantized; with convs on both sides the shortcut is the shorter branch (the downsample conv); an Add
    whose other input is computed from that very conv's output is not a residual add."""
    rng = np.random.default_rng(4)
    conv = [init(f"W{i}", rand(rng, 4, 4, 1, 1)) for i in range(4)]
    nodes_ = [helper.make_node("Conv", ["x", "W0"], ["c0"], name="stem"), helper.make_node("Relu", ["c0"], ["r"]),
              helper.make_node("Conv", ["r", "W1"], ["c1"], name="main1"), helper.make_node("Relu", ["c1"], ["r1"]),
              helper.make_node("Conv", ["r1", "W2"], ["c2"], name="main2"),
              helper.make_node("Conv", ["r", "W3"], ["c3"], name="down"),
              helper.make_node("Add", ["c2", "c3"], ["a1"], name="both_convs"),
              helper.make_node("Add", ["c2", "r"], ["a2"], name="conv_and_skip"),
              helper.make_node("Sigmoid", ["c3"], ["g"]), helper.make_node("Add", ["c3", "g"], ["a3"], name="not_res"),
              helper.make_node("Add", ["a1", "a2"], ["a4"]), helper.make_node("Add", ["a4", "a3"], ["y"])]
    model = make_model(nodes_, {"x": (None, 4, 3, 3)}, ["y"], conv)
    out, pr = quantize(model, [rand(rng, 2, 4, 3, 3)], method="minmax", placement="tensorrt")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    adds = {n.name: [producers.get(i, "input") for i in n.input] for n in out.graph.node if n.op_type == "Add"}
    assert adds["both_convs"] == ["Conv", "DequantizeLinear"]
    assert adds["conv_and_skip"] == ["Conv", "DequantizeLinear"]
    assert adds["not_res"] == ["Conv", "Sigmoid"]
    assert pr.rewritten == 4 and np.isfinite(run(out, rand(rng, 2, 4, 3, 3))).all()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_range_methods_stay_close_to_float(digits, method):
    model, calib, x_test, y_test, ref = digits
    out, pr = quantize(model, calib, method=method, placement="ort", weight_bits=ORT_INT8_WEIGHT_BITS)
    assert any(f"calibrated with {method} on 4 batches" in n for n in pr.notes)
    got = run(out, x_test)
    assert np.isfinite(got).all()
    if method in RANGE_METHODS:
        agree = (got.argmax(1) == ref.argmax(1)).mean()
        err = max_rel_error([ref], [got])
        assert agree >= 0.97 and err <= 0.1, (agree, err)


def test_weights_are_int8_per_output_channel_and_biases_int32(digits):
    model, calib, *_ = digits
    out, _ = quantize(model, calib, method="minmax", placement="ort")
    inits = initializers(out)
    dw = next(n for n in nodes(out, "Conv") if any(a.name == "group" and a.i > 1 for a in n.attribute))
    producers = {o: n for n in out.graph.node for o in n.output}
    w_dq, b_dq = producers[dw.input[1]], producers[dw.input[2]]
    q, s = inits[w_dq.input[0]], inits[w_dq.input[1]]
    assert q.dtype == np.int8 and q.shape == (32, 1, 3, 3) and s.shape == (32,)
    assert np.abs(q).max(axis=(1, 2, 3)).min() == 127  # each channel's largest weight hits the grid's end
    assert inits[b_dq.input[0]].dtype == np.int32
    x_scale = inits[producers[dw.input[0]].input[1]]
    np.testing.assert_allclose(inits[b_dq.input[1]], x_scale * s, rtol=1e-6)


def test_weight_bits_4():
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], {"x": (1, 3, 6, 6)}, ["y"],
                       [init("W", rand(rng, 4, 3, 3, 3))])
    out, pr = quantize(model, [rand(rng, 1, 3, 6, 6)], weight_bits=4, method="minmax")
    q = next(a for a in initializers(out).values() if a.dtype == np.int8)
    assert pr.rewritten == 1 and np.abs(q).max() == 7


def test_minmax_scales_and_onnxruntime_compute_the_quantize_dequantize_math():
    rng = np.random.default_rng(1)
    w = rand(rng, 3, 2, 1, 1)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], {"x": (None, 2, 5, 5)}, ["y"], [init("W", w)])
    batches = [rand(rng, 4, 2, 5, 5) + 0.5 for _ in range(3)]
    out, _ = quantize(model, batches, method="minmax")
    inits = initializers(out)
    q = nodes(out, "QuantizeLinear")[0]
    lo, hi = min(b.min() for b in batches), max(b.max() for b in batches)
    scale, zero_point = inits[q.input[1]], inits[q.input[2]]
    np.testing.assert_allclose(scale, (hi - lo) / 255, rtol=1e-6)  # asymmetric uint8: (max - min) / 255
    assert zero_point.dtype == np.uint8 and zero_point == np.round(-lo / scale)
    w_dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].dtype == np.int8)
    w_q, w_scale = inits[w_dq.input[0]], inits[w_dq.input[1]]
    np.testing.assert_allclose(w_scale, np.abs(w).max(axis=(1, 2, 3)) / 127, rtol=1e-6)  # symmetric: max|w| / 127
    x = batches[0]
    x_hat = (np.clip(np.round(x / scale) + zero_point.astype(np.float32), 0, 255) - zero_point) * scale
    w_hat = w_q.astype(np.float32) * w_scale[:, None, None, None]
    expected = np.einsum("nchw,oc->nohw", x_hat, w_hat[:, :, 0, 0])
    assert max_rel_error([expected], [run(out, x)]) <= 1e-5


def test_symmetric_activations_are_int8_with_zero_point_0(digits):
    model, calib, *_ = digits
    out, _ = quantize(model, calib, method="minmax", act_symmetric=True)
    inits = initializers(out)
    zps = [inits[q.input[2]] for q in nodes(out, "QuantizeLinear")]
    assert zps and all(z.dtype == np.int8 and z == 0 for z in zps)


def test_fixed_batch_model_and_num_batches(tmp_path):
    rng = np.random.default_rng(2)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], {"x": (1, 2, 3, 3)}, ["y"],
                       [init("W", rand(rng, 2, 2, 1, 1))])
    np.savez(tmp_path / "c.npz", x=rand(rng, 8, 2, 3, 3))
    _, pr = quantize(model, str(tmp_path / "c.npz"), method="minmax")
    assert any("on 8 batches" in n for n in pr.notes)
    _, pr = quantize(model, str(tmp_path / "c.npz"), method="minmax", num_batches=3)
    assert any("on 3 batches" in n for n in pr.notes)


def test_what_is_not_quantized_is_reported():
    rng = np.random.default_rng(3)
    nodes_ = [bn_node("bn", "x", "n"), helper.make_node("Conv", ["n", "W"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("Flatten", ["c"], ["f"]), helper.make_node("MatMul", ["f", "f2"], ["y"])]
    model = make_model(nodes_, {"x": (None, 2, 3, 3), "f2": (18, 4)}, ["y"],
                       [init("W", rand(rng, 2, 2, 3, 3)), *bn_initializers(rng, "bn", 2)])
    calib = {"x": rand(rng, 5, 2, 3, 3), "f2": rand(rng, 18, 4)}
    out, pr = quantize(model, [calib], method="minmax")
    assert (pr.matched, pr.rewritten) == (2, 1)
    assert any("not a constant" in r for r in reasons(pr))
    assert any("fold_bn did not fold" in n and "zero-pads" in n for n in pr.notes)
    assert "BatchNormalization" in op_types(out)


def test_input_model_untouched_and_refusals_before_any_work(digits):
    model, calib, *_ = digits
    before = model.SerializeToString()
    quantize(model, calib, method="minmax")
    assert model.SerializeToString() == before
    for options, message in [({"act_bits": 4}, "act_bits=4"), ({"placement": "gpu"}, "placement must be"),
                             ({"method": "magic"}, "unknown calibration method"),
                             ({"weight_bits": 16}, "weight_bits must be")]:
        with pytest.raises(LkfxError, match=message):
            lkfx.transform(model, [("fake_quant", options)], calib_data=calib)
    with pytest.raises(LkfxError, match="--calib-data"):
        lkfx.transform(model, ["fake_quant"])
    twice = quantize(model, calib, method="minmax")[0]
    with pytest.raises(LkfxError, match="already quantized"):
        lkfx.transform(twice, ["fake_quant"], calib_data=calib)
    old = make_model([helper.make_node("Relu", ["x"], ["y"])], {"x": (1, 2)}, ["y"], [], opset=12)
    with pytest.raises(LkfxError, match="opset >= 13"):
        lkfx.transform(old, ["fake_quant"], calib_data=[np.zeros((1, 2), np.float32)])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_backbones(name, tmp_path):
    """Real definitions (random weights, random BN statistics): every conv and the head quantized, onnxruntime
    turns the whole network into integer kernels (one QuantizeLinear at the input, no DequantizeLinear: MaxPool and
    Flatten keep their input's grid), outputs within 10 % of the float model's scale on the calibration data; with
    placement="tensorrt" every residual Add reads its conv directly and its shortcut through QDQ."""
    import torchvision

    torch.manual_seed(0)
    model = randomize_bn(getattr(torchvision.models, name)()).eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=17, input_names=["x"])
    src = onnx.load(str(tmp_path / "m.onnx"))
    out, pr = quantize(src, [x.numpy()], method="percentile", placement="ort")
    assert pr.rewritten == pr.matched and not pr.skipped
    ops = optimized_ops(out, tmp_path)
    assert ops.count("QLinearConv") == pr.matched - 1 and "QGemm" in ops and "Conv" not in ops
    assert ops.count("QuantizeLinear") == 1 and "DequantizeLinear" not in ops, ops
    assert max_rel_error([run(src, x.numpy())], [run(out, x.numpy())]) <= 0.1
    trt, _ = quantize(src, [x.numpy()], method="percentile", placement="tensorrt")
    producers = {o: n.op_type for n in trt.graph.node for o in n.output}
    adds = [sorted(producers[i] for i in n.input) for n in trt.graph.node if n.op_type == "Add"]
    assert adds and all(a == ["Conv", "DequantizeLinear"] for a in adds), adds  # conv + add fusible, shortcut int8
