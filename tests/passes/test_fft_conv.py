"""fft_conv: the cost model (never FFT for 3x3; calibrated once, cached under LKFX_CACHE_DIR), the FX rewrite
(module and functional convs, global selection, `auto` and `always`, refusals with reasons, `check=True`
exact within 1e-5) and the ONNX rewrite (DFT subgraph, opset 20, checked in onnxruntime)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import assert_same_outputs, make_model, op_types, reasons
from onnx import helper, numpy_helper

import lkfx
from lkfx.backends import fft_cost
from lkfx.backends.fft_cost import ConvShape, CostModel, cost_model, machine_key
from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError
from lkfx.graph import onnx as gonnx
from lkfx.modules.fft_conv import FFTConv2d, conv_pads

# A fixed machine: ~30 GMAC/s depthwise up to 13x13 then 2.5 (PyTorch's CPU cliff), dense 60, FFT ~5 G units/s.
FIXED = {
    "conv_t0_s": 5e-5, "fft_t0_s": 2e-5, "op_t0_s": 3e-6, "byte_s": 1e-10, "convert_s": 3e-10, "cmul_s": 1e-9,
    "cmac_s": 2e-10,
    "dw_mac_s": {k: 1 / (30e9 if k <= 13 else 2.5e9) for k in fft_cost.DW_KERNELS},
    "dw_cl_mac_s": {k: 1 / 30e9 for k in fft_cost.DW_KERNELS},
    "dense_mac_s": {k: 1 / 60e9 for k in fft_cost.DENSE_KERNELS},
    "fft_s": {8: 1 / 1e9, 16: 1 / 4e9, 32: 1 / 5e9, 64: 1 / 6e9, 128: 1 / 7e9},
}


@pytest.fixture
def fixed_costs(tmp_path, monkeypatch):
    """LKFX_CACHE_DIR holding the FIXED constants for this machine: `auto` decides deterministically."""
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    (tmp_path / fft_cost.CACHE_FILE).write_text(
        json.dumps({"format": fft_cost._FORMAT, "machines": {machine_key("cpu"): FIXED}}))
    return tmp_path


def shape(batch, c, size, k, groups=None, c_out=None, padding="same"):
    kernel = (k, k)
    return ConvShape(batch, c, c_out or c, c if groups is None else groups, (size, size), kernel,
                     conv_pads(padding, kernel))


# --- cost model ----------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Calibrate with one torch thread: on a loaded 2-core machine two threads stall each other for ages."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_calibration_is_cached(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "cache" / fft_cost.CACHE_FILE
    path.parent.mkdir()
    path.write_text("{not json")  # a corrupt cache is recalibrated and overwritten
    model = cost_model("cpu")
    constants = json.loads(path.read_text())["machines"][machine_key("cpu")]
    assert set(constants) == set(FIXED)
    assert all(v > 0 for table in ("dw_mac_s", "dense_mac_s", "fft_s") for v in constants[table].values())
    assert cost_model("cpu") is model, "calibrated once per process and machine"
    fft_cost._loaded.clear()
    again = cost_model("cpu")
    assert again is not model and again.constants == constants, "read back from the cache file"
    for batch, channels, size in ((1, 1, 7), (64, 2048, 224)):
        assert not again.choose(shape(batch, channels, size, 3)).fft


@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("size", [7, 14, 56, 224])
@pytest.mark.parametrize("channels", [1, 64, 2048])
@pytest.mark.parametrize("depthwise", [True, False])
def test_never_fft_for_3x3(fixed_costs, batch, size, channels, depthwise):
    cheap_fft = CostModel({**FIXED, "fft_s": dict.fromkeys(FIXED["fft_s"], 1e-15), "cmul_s": 1e-15,
                           "cmac_s": 1e-15})
    for model in (cost_model("cpu"), cheap_fft):
        d = model.choose(shape(batch, channels, size, 3, groups=channels if depthwise else 1))
        assert not d.fft and "below 5x5" in d.reason


def test_fixed_model_decisions(fixed_costs):
    """Three candidates, each priced; the choice is the faster direct layout unless the FFT is FFT_MARGIN
    faster; converting the layout is paid by the candidate whose layout differs from the neighbours'."""
    model = cost_model("cpu")
    for batch, c, size, k in ((8, 128, 56, 31), (1, 128, 56, 31), (8, 512, 14, 27), (8, 1024, 7, 13),
                              (8, 64, 56, 51), (2, 16, 14, 5)):
        for channels_last in (False, True):
            d = model.choose(replace(shape(batch, c, size, k), channels_last=channels_last))
            assert set(d.seconds) == set(fft_cost.CANDIDATES) and all(t > 0 for t in d.seconds.values())
            direct = min(d.seconds["nchw"], d.seconds["channels_last"])
            assert d.fft == (d.seconds["fft"] * fft_cost.FFT_MARGIN < direct), d
            assert d.fft or d.seconds[d.choice] == direct, d
            assert all(label in d.reason for label in fft_cost.LABELS.values()), d.reason
    small = shape(2, 16, 14, 5)
    assert model.choose(small).choice == "nchw", "NCHW neighbours: channels-last would pay two conversions"
    assert model.choose(replace(small, channels_last=True)).choice == "channels_last"
    assert model.choose(shape(8, 128, 56, 31)).choice != "nchw", "the NCHW cliff"
    assert model.choose(shape(8, 128, 56, 31), ("channels_last", "fft")).seconds["nchw"] > 0


def test_decisions_are_deterministic_for_a_calibration_file(tmp_path, monkeypatch):
    """Two loads of one calibration file (another process would do the same) give the same decisions."""
    fft_cost._loaded.clear()
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    constants = {**FIXED, "dw_cl_mac_s": {k: 1 / (20e9 + 1e8 * k) for k in fft_cost.DW_KERNELS}}
    (tmp_path / fft_cost.CACHE_FILE).write_text(
        json.dumps({"format": fft_cost._FORMAT, "machines": {machine_key("cpu"): constants}}))
    grid = [shape(b, c, n, k) for b in (1, 8) for c, n in ((64, 56), (256, 28), (512, 14)) for k in (5, 13, 27, 51)]
    first = [cost_model("cpu").choose(g) for g in grid]
    fft_cost._loaded.clear()
    assert [cost_model("cpu").choose(g) for g in grid] == first
    assert len({d.choice for d in first}) >= 2


@pytest.mark.parametrize("entry", ["missing key", "negative", "nan", "not a table"])
def test_foreign_or_invalid_cache_entry_is_recalibrated(tmp_path, monkeypatch, one_thread, entry):
    """Another machine's entry is kept; an entry for this machine that does not hold a complete set of finite,
    non-negative constants (an older format, an edit, a truncated write) is measured again and replaced."""
    fft_cost._loaded.clear()
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    bad = {"missing key": {k: v for k, v in FIXED.items() if k != "dw_cl_mac_s"},
           "negative": {**FIXED, "byte_s": -1.0}, "nan": {**FIXED, "convert_s": float("nan")},
           "not a table": {**FIXED, "fft_s": 3}}[entry]
    path = tmp_path / fft_cost.CACHE_FILE
    path.write_text(json.dumps({"format": fft_cost._FORMAT, "machines": {"other host": FIXED,
                                                                        machine_key("cpu"): bad}}))
    model = cost_model("cpu")
    machines = json.loads(path.read_text())["machines"]
    assert machines["other host"] == json.loads(json.dumps(FIXED))
    assert machines[machine_key("cpu")] == json.loads(json.dumps(model.constants)) != json.loads(json.dumps(bad))
    fft_cost.check_constants(machines[machine_key("cpu")])


# --- FX ---------------------------------------------------------------------------------------------------------
class GlobalNet(nn.Module):
    """Global depthwise (module and functional) and dense convs on a 9x9 map, plus convs the pass must refuse."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 17, padding=8, groups=c)  # 17 = 2 * 9 - 1: every output sees every input
        self.dense = nn.Conv2d(c, c, 9, padding="same")
        self.even = nn.Conv2d(c, c, 10, padding="same", groups=c, bias=False)
        self.fw = nn.Parameter(torch.randn(2 * c, 1, 9, 11) * 0.1)  # depthwise, channel multiplier 2
        self.fb = nn.Parameter(torch.randn(2 * c))
        self.small = nn.Conv2d(2 * c, c, 3, padding=1)
        self.strided = nn.Conv2d(c, c, 9, stride=2, padding=4, groups=c)
        self.dilated = nn.Conv2d(c, c, 9, dilation=2, padding=8, groups=c)
        self.reflect = nn.Conv2d(c, c, 9, padding=4, padding_mode="reflect", groups=c)
        self.grouped = nn.Conv2d(c, c, 9, padding=4, groups=2)
        self.odd_pad = nn.Conv2d(c, c, 9, padding=2, groups=c)

    def forward(self, x):
        y = self.dense(self.dw(x)).relu() + self.even(x)
        y = F.conv2d(y, self.fw, self.fb, padding=(4, 5), groups=8)
        y = self.small(y)
        y = self.reflect(self.dilated(y)) + self.grouped(y)
        return self.strided(y), self.odd_pad(y)


def transform(model, x=None, **options):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = lkfx.transform(model, [("fft_conv", options)], example_inputs=None if x is None else (x,),
                                 check=x is not None, return_report=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "the caller's model changed"
    return out, report["fft_conv"]


def fft_modules(gm) -> list[str]:
    return sorted(name for name, m in gm.named_modules() if isinstance(m, FFTConv2d))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_fx_always_global(fixed_costs):
    torch.manual_seed(0)
    model, x = GlobalNet().eval(), torch.randn(2, 8, 9, 9)
    out, pr = transform(model, x, mode="always")
    assert (pr.matched, pr.rewritten) == (10, 4)
    assert fft_modules(out) == ["conv2d_fft", "dense", "dw", "even"]
    assert out.dw.weight is not model.dw.weight and torch.equal(out.dw.weight, model.dw.weight)
    why = [f"{s.where}: {s.reason}" for s in pr.skipped]
    for key, words in {"small": "does not cover the 9x9", "strided": "stride (2, 2)", "dilated": "dilation (2, 2)",
                       "reflect": "padding mode 'reflect'", "grouped": "only dense (groups=1) or depthwise",
                       "odd_pad": "neither 'same'"}.items():
        assert any(key in r and words in r for r in why), (key, why)
    assert any("dw: 17x17 kernel on 9x9 -> FFT 18x18" in n for n in pr.notes), pr.notes
    assert_same_outputs(model, out, (x,))
    out.train()
    y = out(x)
    y[0].square().mean().backward()
    assert out.dw.weight.grad is not None, "the rewritten model still trains"


def test_fx_min_kernel_needs_no_shapes():
    torch.manual_seed(0)
    model, x = GlobalNet().eval(), torch.randn(1, 8, 9, 9)
    out, pr = transform(model, None, mode="always", min_kernel=9)
    assert pr.rewritten == 4
    assert any("kernel 3x3 is below min_kernel=9" in r for r in reasons(pr))
    assert_same_outputs(model, out, (x,))


def test_fx_global_without_shapes_refuses_with_reason():
    out, pr = transform(GlobalNet().eval(), None)
    assert pr.rewritten == 0 and not fft_modules(out)
    assert sum("example_inputs" in r for r in reasons(pr)) == 5, reasons(pr)


def test_fx_auto_without_shapes_refuses_with_reason():
    _, pr = transform(GlobalNet().eval(), None, min_kernel=5)
    assert pr.rewritten == 0
    assert any("mode='auto' needs the feature-map size" in r for r in reasons(pr))


class Stage(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, k, padding=k // 2, groups=c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw(self.dw(x))


def test_fx_auto_follows_the_cost_model(fixed_costs):
    torch.manual_seed(0)
    model = nn.Sequential(Stage(16, 31), Stage(16, 7), Stage(16, 3)).eval()
    x = torch.randn(8, 16, 56, 56)
    out, pr = transform(model, x, min_kernel=3)
    assert fft_modules(out) == ["0.dw"]
    assert any("0.dw: depthwise 31x31 on 8x16x56x56 -> FFT 72x72: predicted NCHW direct" in n and
               "channels-last direct" in n for n in pr.notes), pr.notes
    why = [f"{s.where}: {s.reason}" for s in pr.skipped]
    assert any("1.dw" in r and "-> NCHW direct: predicted" in r and "kept as it is" in r for r in why), why
    assert any("2.dw" in r and "below 5x5" in r for r in why), why


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.w = nn.Parameter(torch.randn(4, 1, 7, 7))

    def forward(self, x):
        y = self.conv(self.conv(x))
        return F.conv2d(y, self.w, padding=3, groups=4) + F.conv2d(x, self.w, padding=3, groups=4)


def test_fx_shared_weights_stay_shared():
    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(2, 4, 7, 7)
    out, pr = transform(model, x, mode="always")
    assert pr.rewritten == 4
    mods = [m for m in out.modules() if isinstance(m, FFTConv2d)]
    assert len({id(m.weight) for m in mods}) == 2, "two tied pairs"
    assert len(list(out.parameters())) == 3


def test_fx_rerun_leaves_fft_modules_alone():
    torch.manual_seed(0)
    model, x = GlobalNet().eval(), torch.randn(1, 8, 9, 9)
    once, _ = transform(model, x, mode="always")
    twice, pr = transform(once, x, mode="always")
    assert pr.rewritten == 0 and fft_modules(twice) == fft_modules(once)


def test_options_are_checked():
    with pytest.raises(LkfxError, match="'auto' or 'always'"):
        lkfx.transform(nn.Conv2d(1, 1, 3), [("fft_conv", {"mode": "fast"})])
    with pytest.raises(LkfxError, match="min_kernel"):
        lkfx.transform(nn.Conv2d(1, 1, 3), [("fft_conv", {"min_kernel": 0})])
    info = next(p for p in lkfx.list_passes() if p["name"] == "fft_conv")
    assert info["frontends"] == ["fx", "onnx"] and info["options"] == {"min_kernel": None, "mode": "auto"}


# --- ONNX -------------------------------------------------------------------------------------------------------
def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def onnx_net(opset: int = 20, batch="N", size=(9, 10)):
    """Global convs (depthwise + bias, dense even SAME_UPPER, multiplier 2 with taps cropped, valid), a 1x1 and
    a strided one."""
    rng = np.random.default_rng(0)
    init = numpy_helper.from_array
    nodes = [
        helper.make_node("Conv", ["x", "w_dw", "b_dw"], ["a"], group=8, pads=[8, 9, 8, 9], name="dw"),
        helper.make_node("Conv", ["a", "w_dense"], ["b"], auto_pad="SAME_UPPER", name="dense"),
        helper.make_node("Conv", ["b", "w_mult", "b_mult"], ["c"], group=4, pads=[20, 20, 20, 20], name="mult"),
        helper.make_node("Conv", ["c", "w_small"], ["d"], name="small"),
        helper.make_node("Conv", ["d", "w_valid"], ["e"], name="valid"),
        helper.make_node("Conv", ["e", "w_stride"], ["f"], strides=[2, 2], pads=[4, 4, 4, 4], name="strided"),
    ]
    inits = [init(rand(rng, 8, 1, 17, 19) * 0.2, "w_dw"), init(rand(rng, 8), "b_dw"),
             init(rand(rng, 4, 8, 10, 12) * 0.1, "w_dense"), init(rand(rng, 8, 1, 41, 41) * 0.1, "w_mult"),
             init(rand(rng, 8), "b_mult"), init(rand(rng, 8, 8, 1, 1), "w_small"),
             init(rand(rng, 6, 8, 9, 10) * 0.1, "w_valid"), init(rand(rng, 6, 6, 9, 9), "w_stride")]
    model = make_model(nodes, {"x": [2, 8, *size]}, ["f"], inits, opset=opset)
    if batch is not None:  # a symbolic batch dimension
        for vi in (*model.graph.input, *model.graph.output):
            vi.type.tensor_type.shape.dim[0].dim_param = batch
    return model


def run_ort(model, feeds, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = level
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_onnx_always_matches_onnxruntime():
    model = onnx_net()
    out, report = lkfx.transform(model, [("fft_conv", {"mode": "always", "min_kernel": 5})], check=True,
                                 return_report=True)
    pr = report["fft_conv"]
    assert (pr.matched, pr.rewritten) == (6, 4)
    # per conv: 2 DFTs of the kernel (constant-folded at load), 2 forward, 2 inverse
    assert op_types(out).count("Conv") == 2 and op_types(out).count("DFT") == 6 * 4
    assert report.check["max_rel_error"] <= 1e-5
    assert any("mult: 41x41 kernel on 9x10 -> DFT 32x32" in n for n in pr.notes), pr.notes
    why = [f"{s.where}: {s.reason}" for s in pr.skipped]
    assert any("small" in r and "below min_kernel=5" in r for r in why), why
    assert any("strided" in r and "strides [2, 2]" in r for r in why), why
    assert out.opset_import[0].version == 20
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(1).standard_normal((3, 8, 9, 10)).astype(np.float32)  # another batch size
    ref = gonnx.run(model, {"x": x})
    assert max_rel_error(ref, gonnx.run(out, {"x": x})) <= 1e-5
    assert max_rel_error(ref, run_ort(out, {"x": x})) <= 1e-5, "also with constant folding and fusions"


def test_onnx_default_selects_global_convs_and_auto_refuses():
    pr = lkfx.transform(onnx_net(), ["fft_conv"], return_report=True)[1]["fft_conv"]
    why = [f"{s.where}: {s.reason}" for s in pr.skipped]
    assert pr.rewritten == 0
    assert sum("mode='auto' has no cost model for ONNX runtimes" in r for r in why) == 4, why
    assert any("small" in r and "does not cover the 9x10 feature map" in r for r in why), why
    out, report = lkfx.transform(onnx_net(), [("fft_conv", {"mode": "always"})], check=True, return_report=True)
    assert report["fft_conv"].rewritten == 4


def test_onnx_old_opset_refused_with_the_fix():
    pr = lkfx.transform(onnx_net(opset=17), [("fft_conv", {"mode": "always"})], return_report=True)[1]["fft_conv"]
    assert pr.rewritten == 0
    assert all("opset 17 is below 20" in r and "convert_version(model, 20)" in r for r in reasons(pr))


def test_onnx_needs_static_spatial_sizes():
    model = onnx_net(size=(9, 10))
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    del model.graph.value_info[:]
    pr = lkfx.transform(model, [("fft_conv", {"mode": "always", "min_kernel": 5})], return_report=True)[1]
    assert pr["fft_conv"].rewritten == 0
    assert any("not static" in r for r in reasons(pr["fft_conv"]))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_from_torch_export(tmp_path):
    """A torch-exported global conv, converted to opset 20, rewritten and checked in onnxruntime."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 4, 13, padding=6, groups=4), nn.ReLU(), nn.Conv2d(4, 2, 7, padding=3)).eval()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 4, 7, 7),), str(path), opset_version=18, dynamo=False)
    model = onnx.version_converter.convert_version(onnx.load(str(path)), 20)
    out, report = lkfx.transform(model, [("fft_conv", {"mode": "always"})], check=True, return_report=True)
    assert report["fft_conv"].rewritten == 2 and "Conv" not in op_types(out)


class Head(nn.Module):
    """Two RepLK-style stages, then a layout-sensitive head (view needs contiguous memory)."""

    def __init__(self, c: int = 16, k: int = 17):
        super().__init__()
        self.stages = nn.Sequential(Stage(c, k), nn.BatchNorm2d(c), nn.ReLU(), Stage(c, k))
        self.fc = nn.Linear(c * 4, 3)

    def forward(self, x):
        s = self.stages(x)
        y = nn.functional.adaptive_avg_pool2d(s, 2)
        return self.fc(y.view(y.shape[0], -1)), s


@pytest.fixture
def slow_fft(tmp_path, monkeypatch):
    """FIXED, but an FFT too slow to win: the choice is between the two direct layouts."""
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    constants = {**FIXED, "fft_s": dict.fromkeys(FIXED["fft_s"], 1e-6)}
    (tmp_path / fft_cost.CACHE_FILE).write_text(
        json.dumps({"format": fft_cost._FORMAT, "machines": {machine_key("cpu"): constants}}))


def test_fx_channels_last_run_converted_once_at_its_edges(slow_fft):
    """NCHW model, large convs cheaper channels-last: the run of convs, BN, ReLU and adds between the input and
    the pooling is converted once on the way in and once on the way out, not per conv; values unchanged; the
    outputs keep their NCHW layout."""
    torch.manual_seed(0)
    model = Head().eval()
    x = torch.randn(2, 16, 28, 28)
    out, pr = transform(model, x, min_kernel=5)
    conversions = [n for n in out.graph.nodes if n.op == "call_method" and n.target == "contiguous"]
    assert len(conversions) == 2, out.code  # in: x; out: one for the pooling and the second output
    assert pr.rewritten == 2 and len(pr.notes) == 2 and all("channels-last run" in n for n in pr.notes), pr.notes
    assert all("-> channels-last direct: predicted NCHW direct" in n for n in pr.notes)
    with torch.no_grad():
        for got, ref in zip(out(x), model(x), strict=True):
            assert got.is_contiguous() and max_rel_error([ref.numpy()], [got.numpy()]) <= 1e-5


def test_fx_channels_last_model_keeps_its_layout(slow_fft):
    """A channels-last model with a channels-last input needs no conversion: nothing is inserted, the convs are
    reported as channels-last direct and kept as they are, the outputs stay channels-last."""
    torch.manual_seed(0)
    model = nn.Sequential(Stage(16, 17), Stage(16, 17)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 28, 28).contiguous(memory_format=torch.channels_last)
    out, pr = transform(model, x, min_kernel=5)
    assert not any(n.op == "call_method" for n in out.graph.nodes) and pr.rewritten == 0
    assert all("-> channels-last direct" in s.reason and "kept as it is" in s.reason
               for s in pr.skipped if "dw" in s.where)
    with torch.no_grad():
        assert out(x).is_contiguous(memory_format=torch.channels_last)


def test_fx_channels_last_model_gets_nchw_where_nchw_is_cheaper(tmp_path, monkeypatch):
    """Channels-last model, a conv whose NCHW form is far cheaper even with two conversions: converted to NCHW
    and back around that conv alone; the output stays channels-last and equal."""
    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    constants = {**FIXED, "fft_s": dict.fromkeys(FIXED["fft_s"], 1e-6),
                 "dw_mac_s": dict.fromkeys(fft_cost.DW_KERNELS, 1e-12)}
    (tmp_path / fft_cost.CACHE_FILE).write_text(
        json.dumps({"format": fft_cost._FORMAT, "machines": {machine_key("cpu"): constants}}))
    torch.manual_seed(0)
    model = nn.Sequential(Stage(16, 17)).eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 28, 28).contiguous(memory_format=torch.channels_last)
    out, pr = transform(model, x, min_kernel=5)
    formats = [n.kwargs.get("memory_format") for n in out.graph.nodes if n.op == "call_method"]
    assert formats == [torch.contiguous_format, torch.channels_last], out.code
    assert pr.rewritten == 1 and "-> NCHW direct" in pr.notes[0] and "converted in and out" in pr.notes[0]
    with torch.no_grad():
        y = out(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert max_rel_error([model(x).numpy()], [y.numpy()]) <= 1e-5
