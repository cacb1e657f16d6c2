"""fold_bn on timm modules that used to leave BatchNorms behind without a word, on torch.fx and ONNX:

1. conv-like conv subclasses (Conv2dSame, every tf_* port): kept whole, BN folded after them; BN before them and
   StdConv2d (weight standardised in forward) refused with the reason;
2. modules torch.fx cannot trace: every BatchNorm of the model is folded or listed with its reason;
3. a BatchNorm read by several convs (MobileNetV4's attention: the norm feeding q / k / v) folds into each when
   that is exact for all;
4. check=True / --check on a deep network (efficientnetv2_rw_t) tells float32 rounding from a wrong fold.

Random weights, random BatchNorm statistics, small inputs; nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from helpers import assert_same_outputs

import lkfx
import lkfx.cli
from lkfx.errors import CheckError
from lkfx.passes import register_pass
from lkfx.passes.fold_bn import ZERO_PAD_REASON, FoldBN
from lkfx.zoo import export_onnx, randomize_batchnorm

timm = pytest.importorskip("timm")
from timm.layers import Conv2dSame, StdConv2d  # noqa: E402
from timm.models._efficientnet_blocks import MobileAttention  # noqa: E402

BN = nn.modules.batchnorm._BatchNorm


def n_bn(model: nn.Module) -> int:
    return sum(isinstance(m, BN) for m in model.modules())


def n_bn_onnx(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def assert_accounted(pr, total: int) -> None:
    """Every BatchNorm is folded, or skipped with a reason that names it (Skip.node)."""
    named = {s.node for s in pr.skipped}
    assert "" not in named and all(s.reason for s in pr.skipped)
    assert pr.rewritten + len(named) == total, (pr.rewritten, sorted(named), total)


def fold_fx(model: nn.Module, x: torch.Tensor):
    out, report = lkfx.transform(model, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    assert_same_outputs(model, out, (x,))
    assert_accounted(report["fold_bn"], n_bn(model))
    return out, report["fold_bn"]


def fold_onnx(model: nn.Module, x: torch.Tensor, tmp_path):
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path, 17)
    src = onnx.load(str(path))
    out, report = lkfx.transform(src, ["fold_bn"], example_inputs={src.graph.input[0].name: x.numpy()}, check=True,
                                 return_report=True)
    assert_accounted(report["fold_bn"], n_bn_onnx(src))
    return out, report["fold_bn"]


def bn_after(conv: nn.Module, bn_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    c = conv.out_channels if not bn_first else conv.in_channels
    layers = [nn.BatchNorm2d(c), conv] if bn_first else [conv, nn.BatchNorm2d(c)]
    return randomize_batchnorm(nn.Sequential(*layers)).eval()


# --- 1. conv-like modules -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{"stride": 2}, {"stride": 2, "groups": 8, "bias": False}, {"dilation": 2}])
def test_conv2dsame_then_bn_folds(kw, tmp_path):
    model = bn_after(Conv2dSame(8, 8, 3, **kw))
    x = torch.randn(2, 8, 17, 15)
    out, pr = fold_fx(model, x)
    assert (pr.matched, pr.rewritten, pr.skipped) == (1, 1, [])
    assert n_bn(out) == 0 and any(isinstance(m, Conv2dSame) for m in out.modules())
    out, pr = fold_onnx(model, x, tmp_path)
    assert pr.rewritten == 1 and n_bn_onnx(out) == 0


def test_bn_before_conv2dsame_is_refused_with_reason(tmp_path):
    model = bn_after(Conv2dSame(8, 8, 3, stride=2), bn_first=True)
    x = torch.randn(2, 8, 17, 15)
    out, pr = fold_fx(model, x)
    assert pr.rewritten == 0 and n_bn(out) == 1
    assert "Conv2dSame, whose own forward may pad its input" in pr.skipped[0].reason
    _, pr = fold_onnx(model, x, tmp_path)  # exported as Pad -> Conv: no conv reads the BN
    assert pr.rewritten == 0 and pr.skipped[0].reason.startswith("no Conv / ConvTranspose / Gemm next to it")


def test_stdconv_then_bn_is_refused_with_reason(tmp_path):
    model = bn_after(StdConv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 8, 9, 9)
    out, pr = fold_fx(model, x)
    assert pr.rewritten == 0 and n_bn(out) == 1
    assert [s.reason for s in pr.skipped] == ["conv->bn: the conv weight is computed in the graph, not a parameter"]
    _, pr = fold_onnx(model, x, tmp_path)
    assert pr.rewritten == 0 and "weight is not a constant" in pr.skipped[0].reason


@pytest.mark.parametrize("name", ["tf_efficientnet_b0", "tf_mobilenetv3_small_100"])
def test_tf_ports_fold_every_bn(name, tmp_path):
    """Conv2dSame in the stem and every strided block: the whole model traces and every BN folds."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    out, pr = fold_fx(model, x)
    assert isinstance(out, torch.fx.GraphModule), "the whole model traces (Conv2dSame is a leaf)"
    assert pr.rewritten == n_bn(model) and n_bn(out) == 0
    out, pr = fold_onnx(model, x, tmp_path)
    assert n_bn_onnx(out) == 0


# --- 2. modules torch.fx cannot trace -----------------------------------------------------------------------
class Gate(nn.Module):
    """Data-dependent control flow around a timm conv-BN-act block."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d, ConvNormAct

        self.block = ConvNormAct(8, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.bn_act = BatchNormAct2d(8)

    def forward(self, x):
        y = self.block(x)
        return self.bn(y) if y.sum() > 0 else self.bn_act(y)


def test_bns_inside_untraceable_modules_are_listed(tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 1), Gate())).eval()
    x = torch.randn(2, 3, 8, 8)
    out, pr = fold_fx(model, x)
    assert pr.rewritten == 1  # inside the ConvNormAct, which traces alone
    hidden = {s.node: s.reason for s in pr.skipped}
    assert set(hidden) == {"1.bn", "1.bn_act"}
    assert all(r.startswith("inside 1, which torch.fx cannot trace (in the top-level forward: symbolically traced")
               for r in hidden.values()), hidden


class AuxHead(nn.Module):
    """An auxiliary head run in training only (torchvision's GoogLeNet): its BN is not in the traced graph."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.bn(self.conv(x))
        return (y, self.aux(y)) if self.training else y


def test_bn_the_traced_forward_does_not_use_is_listed():
    model = randomize_batchnorm(AuxHead()).eval()
    _, pr = fold_fx(model, torch.randn(2, 3, 8, 8))
    assert pr.rewritten == 1
    assert [(s.node, s.reason) for s in pr.skipped] == [
        ("aux.1", "the traced forward does not use it (a branch not taken, e.g. a head used in training only)")]


@pytest.mark.parametrize("name", ["efficientvit_m0", "mobilevitv2_050"])
def test_untraceable_timm_models_account_for_every_bn(name, tmp_path):
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model(name, pretrained=False)).eval()
    x = torch.randn(1, 3, 64, 64)
    _, pr = fold_fx(model, x)
    assert pr.rewritten > 0
    fold_onnx(model, x, tmp_path)


# --- 3. a BatchNorm read by several convs -------------------------------------------------------------------
def attention(kv_stride: int) -> nn.Module:
    """MobileNetV4's attention block (mobilenetv4_hybrid_*): BatchNormAct2d (no act) feeding q, k and v."""
    torch.manual_seed(0)
    block = MobileAttention(32, 32, num_heads=2, key_dim=16, value_dim=16, use_multi_query=True,
                            kv_stride=kv_stride, layer_scale_init_value=None, noskip=True)
    return randomize_batchnorm(block).eval()


def test_mobilenetv4_attention_norm_folds_into_q_k_v(tmp_path):
    model = attention(kv_stride=1)  # q, k and v are 1x1 convs of the normalised input
    x = torch.randn(2, 32, 8, 8)
    out, pr = fold_fx(model, x)
    assert (pr.rewritten, pr.skipped, n_bn(out)) == (1, [], 0)
    out, pr = fold_onnx(model, x, tmp_path)
    assert (pr.rewritten, pr.skipped, n_bn_onnx(out)) == (1, [], 0)


def test_mobilenetv4_attention_norm_with_padded_readers_is_refused(tmp_path):
    model = attention(kv_stride=2)  # k and v start with a zero-padded strided depthwise conv: not exact
    x = torch.randn(2, 32, 8, 8)
    _, pr = fold_fx(model, x)
    refusals = [s.reason for s in pr.skipped if s.node == "norm"]
    assert refusals and all(r.endswith(ZERO_PAD_REASON) for r in refusals), refusals
    assert any("also used by attn.key.down_conv" in r for r in refusals)
    _, pr = fold_onnx(model, x, tmp_path)
    assert any(s.reason.endswith(ZERO_PAD_REASON) for s in pr.skipped)


# --- 4. --check on a deep network ---------------------------------------------------------------------------
@register_pass
class WrongShift(FoldBN):
    """fold_bn, then one folded bias moved by 0.5 (a corrupted shift): a wrong fold on purpose."""

    name = "test_fold_bn_wrong_shift"
    summary = "fold_bn with one corrupted shift"

    def run_fx(self, gm, ctx):
        gm = super().run_fx(gm, ctx)
        conv = next(m for m in gm.modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
        with torch.no_grad():
            conv.bias[0] += 0.5
        return gm

    def run_onnx(self, graph, ctx):
        super().run_onnx(graph, ctx)
        bias = next(t for t in graph.tensors().values() if t.name.endswith("_bias"))
        bias.values = bias.values.copy()
        bias.values[0] += 0.5


@pytest.fixture(scope="module")
def efficientnetv2():
    """timm efficientnetv2_rw_t with random affine BN parameters and running statistics of random data, batch 1,
    64 x 64: deep enough that float32 rounding alone moves the output by more than 1e-5."""
    torch.manual_seed(0)
    model = randomize_batchnorm(timm.create_model("efficientnetv2_rw_t", pretrained=False))
    for m in model.modules():
        if isinstance(m, BN):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 64, 64))
    return model.eval(), torch.randn(1, 3, 64, 64)


def test_efficientnetv2_check_fx(efficientnetv2):
    model, x = efficientnetv2
    _, report = lkfx.transform(model, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    c = report.check
    assert c["max_rel_error"] > c["tolerance"], "the float32 rule alone would refuse this correct fold"
    assert c["passed"] and c["reference"] == "float64"
    assert c["rewritten_float64_error"] < c["original_error"], "weights rounded once: less than float32 rounding"
    assert "rewritten run in float64" in str(report)
    with pytest.raises(CheckError, match="from a float64 run of the original, the original itself"):
        lkfx.transform(model, ["test_fold_bn_wrong_shift"], example_inputs=x, check=True)


def test_efficientnetv2_check_onnx_cli(efficientnetv2, tmp_path):
    model, x = efficientnetv2
    src, dst, rep = tmp_path / "v2.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    export_onnx(model, x, src, 17)
    assert lkfx.cli.main(["optimize", str(src), "-o", str(dst), "-p", "fold_bn", "--check", "--report", str(rep),
                          "-q"]) == 0
    c = json.loads(rep.read_text())["check"]
    assert c["max_rel_error"] > c["tolerance"] and c["passed"] and c["reference"] == "float64"
    assert c["rewritten_float64_error"] <= c["original_error"] + c["tolerance"]
    assert c["rewritten_float64_error"] < c["original_error"], "weights rounded once: less than float32 rounding"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = lkfx.cli.main(["optimize", str(src), "-o", str(tmp_path / "bad.onnx"), "-p",
                              "test_fold_bn_wrong_shift", "--check", "-q"])
    assert code == 1 and not (tmp_path / "bad.onnx").exists()
    assert "from a float64 run of the original, the original itself" in err.getvalue()


def test_check_without_a_float64_run_says_so():
    """A model that cannot run in float64 (its forward casts to float32) keeps the float32 rule."""

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x.float()))

    model = randomize_batchnorm(Fixed()).eval()
    with pytest.raises(CheckError, match="no float64 run of the original .*judged against the original in float32"):
        lkfx.transform(model, ["test_fold_bn_wrong_shift"], example_inputs=torch.randn(1, 3, 4, 4), check=True)


@register_pass
class WrongShiftFloat32(WrongShift):
    """The corrupted fold, whose forward then casts its input to float32: it cannot run in float64."""

    name = "test_fold_bn_wrong_shift_float32"

    def run_fx(self, gm, ctx):
        gm = super().run_fx(gm, ctx)
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        with gm.graph.inserting_after(x):
            cast = gm.graph.call_method("float", (x,))
        x.replace_all_uses_with(cast, delete_user_cb=lambda n: n is not cast)
        gm.recompile()
        return gm


def test_check_without_a_float64_run_of_the_rewritten_model_says_so():
    """The original runs in float64, the rewritten model does not: its float32 run is judged (the 2x rule)."""
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()
    with pytest.raises(CheckError, match="no float64 run of the rewritten model .*RuntimeError.*at most twice"):
        lkfx.transform(model, ["test_fold_bn_wrong_shift_float32"], example_inputs=torch.randn(1, 3, 6, 6),
                       check=True)


def test_onnx_float64_reference_runs_conv_graphs():
    """onnxruntime has no float64 Conv kernel: the float64 run falls back to onnx's reference evaluator."""
    from lkfx.graph import onnx as gonnx

    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W")
    node = onnx.helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, [1, 3, 5, 5])],
                                   [onnx.helper.make_tensor_value_info("y", 1, [1, 4, 5, 5])], [w])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    (y,), why = gonnx.run_float64(model, {"x": x})
    assert why is None and y.dtype == np.float64
    weight = torch.from_numpy(onnx.numpy_helper.to_array(w).copy()).double()
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).double(), weight, padding=1).numpy()
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
