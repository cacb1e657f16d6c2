"""fold_bn conformance over real model definitions (torchvision, timm) with random weights.

For each model of `zoo_models.FOLD_BN` (built by `lkfx.zoo`):

* FX: ``transform(model, ["fold_bn"], check=True)`` matches eager to 1e-5; an independent classifier (written
  here, not the pass's own matcher) finds every batch-norm in the graph (module or ``F.batch_norm``) and says
  whether it can fold: into the conv / linear that produces it (the conv output has no other data users), or
  into the conv it feeds (no zero padding). The pass must fold exactly the foldable ones, leave none behind,
  list every refused conv-adjacent BN in its report with a reason, and rewrite nothing on a second run.
* ONNX: the eval model exported with BatchNormalization kept; ``lkfx optimize -p fold_bn --check``
  (in-process and, for one model, ``python -m lkfx``) exits 0, writes a model that passes onnx.checker, has
  fewer BatchNormalization nodes, none left right after a conv whose output only it reads, and matches in
  onnxruntime.
* A model with data-dependent control flow in one submodule (a small hand-written one, and real timm models)
  falls back to rewriting the traceable submodules: their foldable BNs fold, outputs match, and the report
  names the submodule that cannot be traced.

timm's BatchNormAct2d traces to ``_assert(x.ndim == 4)`` + ``F.batch_norm``: the ``ndim`` read is a metadata read
that must not block the fold; EfficientVit's parent forward reads plain attributes of a child that the fallback
replaces. Both were bugs once and are covered here.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from zoo_models import FOLD_BN, UNTRACEABLE, ZooModel, build, example_input, export_onnx, randomize_batchnorm

import lkfx
import lkfx.cli
from lkfx.zoo import bn_accounting

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]

def rel_error(ref: torch.Tensor | np.ndarray, out: torch.Tensor | np.ndarray) -> float:
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    assert ref.shape == out.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


# --- an independent classifier of batch-norms in an FX graph ------------------------------------------------
META_ATTRS = {"ndim", "shape", "dtype", "device", "is_cuda"}
META_METHODS = {"size", "dim"}
FUNCTIONAL_CONVS = (F.conv1d, F.conv2d, F.conv3d)


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if index < len(node.args) else node.kwargs.get(name, default)


def _is_metadata_read(node: fx.Node) -> bool:
    """Reads only shape / dtype / device, which a fold does not change."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in META_ATTRS
    return node.op == "call_method" and node.target in META_METHODS


def data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not _is_metadata_read(u)]


def is_batch_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)
    return node.op == "call_function" and "batch_norm" in getattr(node.target, "__name__", str(node.target))


def bn_name(node: fx.Node) -> str:
    """How the report names a BN: the module path, or the node name for functional calls."""
    return str(node.target) if node.op == "call_module" else node.name


@dataclass
class Layer:
    """A conv / conv-transpose / linear node, as far as folding cares."""

    kind: str
    in_ch: int
    out_ch: int
    zero_pads: bool
    constant_weight: bool


def as_layer(gm: fx.GraphModule, node: fx.Node) -> Layer | None:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, nn.Linear):
            return Layer("linear", m.in_features, m.out_features, False, True)
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.padding == "same":
                pads = any(k > 1 for k in m.kernel_size)
            else:
                pads = m.padding != "valid" and any(p != 0 for p in m.padding)
            return Layer("conv_transpose" if m.transposed else "conv", m.in_channels, m.out_channels,
                         pads and m.padding_mode == "zeros", True)
        return None
    if node.op != "call_function":
        return None
    weight = _arg(node, 1, "weight")
    if not isinstance(weight, fx.Node):
        return None
    constant = weight.op == "get_attr"
    w = attrgetter(weight.target)(gm) if constant else weight.meta["tensor_meta"]
    if node.target is F.linear:
        return Layer("linear", w.shape[1], w.shape[0], False, constant)
    if node.target in FUNCTIONAL_CONVS:
        pad = _arg(node, 4, "padding", 0)
        if pad == "same":
            pads = any(k > 1 for k in w.shape[2:])
        else:
            pads = pad != "valid" and any(p != 0 for p in (pad if isinstance(pad, (tuple, list)) else [pad]))
        groups = _arg(node, 6, "groups", 1)
        return Layer("conv", w.shape[1] * groups, w.shape[0], pads, constant)
    return None


@dataclass
class BnState:
    channels: int
    inference: bool  # eval mode with running statistics: a fixed per-channel affine map


def bn_state(gm: fx.GraphModule, node: fx.Node) -> BnState:
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        return BnState(m.num_features, not m.training and m.running_mean is not None)
    assert node.target is F.batch_norm, f"unknown batch-norm form {node.target} in {node.name}"
    mean, var = _arg(node, 1, "running_mean"), _arg(node, 2, "running_var")
    stats = all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (mean, var))
    training = _arg(node, 5, "training", False)
    channels = attrgetter(mean.target)(gm).numel() if stats else -1
    return BnState(channels, stats and training is False)


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    return len(meta.shape) if meta is not None else None


def classify(gm: fx.GraphModule, bn: fx.Node) -> tuple[str, str]:
    """("foldable" | "refused" | "unpaired", why). Needs tensor_meta (ShapeProp) for the Linear rank rule."""
    state = bn_state(gm, bn)
    src = bn.args[0]
    producer = as_layer(gm, src) if isinstance(src, fx.Node) else None
    users = data_users(bn)
    consumer = as_layer(gm, users[0]) if len(users) == 1 and users[0].args[:1] == (bn,) else None
    if consumer is not None and consumer.kind == "conv_transpose":
        consumer = None  # its border outputs sum fewer taps: a shift before it is never a bias after it
    if producer is None and consumer is None:
        return "unpaired", "no conv / linear produces it or reads it alone"
    if not state.inference:
        return "refused", "training mode or no running statistics"
    why = []
    if producer is not None:
        others = [u.name for u in data_users(src) if u is not bn]
        if others:
            why.append(f"producer output also read by {others}")
        elif not producer.constant_weight:
            why.append("producer weight is computed")
        elif producer.out_ch != state.channels:
            why.append("channel mismatch with producer")
        elif producer.kind == "linear" and _rank(src) != 2:
            why.append("linear output is not 2-D")
        else:
            return "foldable", f"into {src.name} (after)"
    if consumer is not None:
        if consumer.zero_pads:
            why.append("consumer conv zero-pads")
        elif not consumer.constant_weight:
            why.append("consumer weight is computed")
        elif consumer.in_ch != state.channels:
            why.append("channel mismatch with consumer")
        elif consumer.kind == "linear" and _rank(bn) != 2:
            why.append("linear input is not 2-D")
        else:
            return "foldable", f"into {users[0].name} (before)"
    return "refused", "; ".join(why)


def classify_all(gm: fx.GraphModule, *inputs: torch.Tensor) -> dict[str, list[tuple[fx.Node, str]]]:
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    out: dict[str, list[tuple[fx.Node, str]]] = {"foldable": [], "refused": [], "unpaired": []}
    for node in gm.graph.nodes:
        if is_batch_norm(gm, node):
            verdict, why = classify(gm, node)
            out[verdict].append((node, why))
    return out


def mentions(where: str, name: str) -> bool:
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w.])", where) is not None


def assert_accounted(model: nn.Module, rep) -> None:
    """Every BatchNorm module of the model: folded, or skipped with a reason that names it."""
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bn_accounting(total, rep.rewritten, [(s.node, s.reason) for s in rep.skipped])


def assert_none_left(left: list[str], folded: int) -> None:
    assert not left, f"fold_bn left {len(left)} foldable BNs ({folded} folded):\n" + "\n".join(left[:9])


def check_fx_result(model: nn.Module, x: torch.Tensor) -> tuple[fx.GraphModule, lkfx.Report]:
    """Run fold_bn on `model` and assert every FX conformance property; return the result and report."""
    with torch.no_grad():
        ref = model(x)
    before = classify_all(fx.symbolic_trace(copy.deepcopy(model)), x)
    result, report = lkfx.transform(model, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    rep = report["fold_bn"]
    assert isinstance(result, fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(model(x), ref), "transform changed the caller's model"
        err = rel_error(ref, result(x))
    assert err <= TOL, f"max relative error {err:.3g} > {TOL}"
    assert report.check["passed"]

    after = classify_all(result, x)
    assert_none_left([f"{bn_name(n)}: {why}" for n, why in after["foldable"]], rep.rewritten)
    for node, why in after["refused"]:
        reasons = [s.reason for s in rep.skipped if mentions(s.where, bn_name(node))]
        assert reasons and all(reasons), f"{bn_name(node)} must be refused ({why}), reason in the report"
    foldable = len(before["foldable"])
    assert rep.rewritten == foldable, f"folded {rep.rewritten}, foldable {foldable}"
    n_before, n_after = sum(map(len, before.values())), sum(map(len, after.values()))
    assert n_before - n_after == rep.rewritten
    assert rep.matched == rep.rewritten + len(rep.skipped)
    assert rep.modified == (rep.rewritten > 0)
    assert_accounted(model, rep)

    _, again = lkfx.transform(result, ["fold_bn"], example_inputs=x, return_report=True)
    assert again["fold_bn"].rewritten == 0, "a second fold_bn run still rewrote something"
    return result, report


# --- FX over the zoo ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in FOLD_BN])
def test_fx_zoo(spec: ZooModel) -> None:
    model, x = build(spec), example_input()
    _, report = check_fx_result(model, x)
    if spec.has_batchnorm:
        assert report["fold_bn"].rewritten > 0
    else:
        assert report["fold_bn"].matched == 0 and not report.modified


class _ConvBNResidual(nn.Module):
    """conv -> BN whose conv output is also added back (must refuse), then BN -> zero-padded 3x3 conv (must
    refuse), then BN -> 1x1 conv (folds before) and conv -> BN (folds after)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.bn2, self.conv2 = nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1)
        self.bn3, self.conv3, self.bn4 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv1(x)
        y = self.bn1(y) + y
        y = self.conv2(self.bn2(y)).relu()
        return self.bn4(self.conv3(self.bn3(y)))


def test_fx_classifier_sees_refusals() -> None:
    """The conformance check itself: legitimate refusals pass it, and it counts what must fold."""
    model, x = randomize_batchnorm(_ConvBNResidual()).eval(), torch.randn(2, 3, 16, 16)
    classes = classify_all(fx.symbolic_trace(model), x)
    verdicts = {bn_name(n): verdict for verdict, nodes in classes.items() for n, _ in nodes}
    assert verdicts == {"bn1": "refused", "bn2": "refused", "bn3": "foldable", "bn4": "foldable"}
    _, report = check_fx_result(model, x)
    assert report["fold_bn"].rewritten == 2


# --- ONNX over the zoo --------------------------------------------------------------------------------------
def count_bn(proto: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in proto.graph.node)


def foldable_onnx_bns(proto: onnx.ModelProto) -> list[str]:
    """BatchNormalization nodes right after a Conv / ConvTranspose / Gemm whose output only they read."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in proto.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    graph_outputs = {o.name for o in proto.graph.output}
    left = []
    for n in proto.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        src = producer.get(n.input[0])
        if src is not None and src.op_type in ("Conv", "ConvTranspose", "Gemm") and readers[n.input[0]] == 1 \
                and n.input[0] not in graph_outputs:
            left.append(f"{src.name} -> {n.name}")
    return left


def ort_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


def check_onnx_result(src: Path, dst: Path, report_path: Path, x: np.ndarray, has_batchnorm: bool) -> None:
    proto_in, proto_out = onnx.load(str(src)), onnx.load(str(dst))
    onnx.checker.check_model(proto_out, full_check=True)
    n_in, n_out = count_bn(proto_in), count_bn(proto_out)
    if has_batchnorm:
        assert n_out < n_in
    else:
        assert n_in == n_out == 0
    left = foldable_onnx_bns(proto_out)
    assert not left, f"foldable BatchNormalization left: {left}"
    report = json.loads(report_path.read_text())
    rep = report["passes"][0]
    assert rep["name"] == "fold_bn" and rep["rewritten"] == n_in - n_out
    bn_accounting(n_in, rep["rewritten"], [(s.get("node", ""), s["reason"]) for s in rep["skipped"]])
    assert report["check"]["passed"] and report["check"]["max_rel_error"] <= TOL
    ref, out = ort_outputs(src, x), ort_outputs(dst, x)
    assert len(ref) == len(out)
    for r, o in zip(ref, out, strict=True):
        assert rel_error(r, o) <= TOL


def _exported(spec: ZooModel, folder: Path) -> tuple[Path, np.ndarray]:
    model, x = build(spec), example_input()
    src = folder / f"{spec.name}.onnx"
    export_onnx(model, x, src)
    proto = onnx.load(str(src))
    if spec.has_batchnorm:
        assert count_bn(proto) > 0, "the export folded the BatchNorms away; the test would prove nothing"
    return src, x.numpy()


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in FOLD_BN])
def test_onnx_cli_zoo(spec: ZooModel, tmp_path: Path) -> None:
    src, x = _exported(spec, tmp_path)
    dst, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["optimize", str(src), "-o", str(dst), "-p", "fold_bn", "--check", "--report", str(report)]
    assert lkfx.cli.main(args) == 0
    check_onnx_result(src, dst, report, x, spec.has_batchnorm)


def test_onnx_cli_subprocess(tmp_path: Path) -> None:
    spec = next(s for s in FOLD_BN if s.id == "tv-mobilenet_v3_small")
    src, x = _exported(spec, tmp_path)
    dst, report = tmp_path / "out.onnx", tmp_path / "report.json"
    args = ["optimize", str(src), "-o", str(dst), "-p", "fold_bn", "--check", "--report", str(report)]
    proc = subprocess.run([sys.executable, "-m", "lkfx", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout
    check_onnx_result(src, dst, report, x, spec.has_batchnorm)


# --- a model torch.fx cannot trace -----------------------------------------------------------------------
class _Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this module."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.bn(self.conv(x))
        if y.sum() > 0:
            return y.relu()
        return -y


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + x


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage = nn.Sequential(_Block(8), _Gate(8))
        self.head = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.head(self.stage(self.stem(x)))


def first_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, tuple]:
    """What each submodule received first when `model` runs on `x`."""
    inputs: dict[str, tuple] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args))
             for name, m in model.named_modules() if name]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return inputs


def foldable_in_traceable_parts(model: nn.Module, x: torch.Tensor) -> int:
    """Foldable BNs inside the largest submodules torch.fx can trace: what the fallback must fold.

    Each trace gets a fresh copy: tracing can leave proxies in module state (timm's CascadedGroupAttention
    caches its attention biases by str(device) in eval mode), which would break the next trace."""
    inputs = first_inputs(model, x)

    def count(module: nn.Module, prefix: str) -> int:
        total = 0
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            try:
                gm = fx.symbolic_trace(copy.deepcopy(child))
            except Exception:  # symbolic tracing fails with many error types
                total += count(child, f"{full}.")
                continue
            if full in inputs:
                total += len(classify_all(gm, *inputs[full])["foldable"])
        return total

    return count(model, "")


def foldable_left_in_graph_children(result: nn.Module, x: torch.Tensor) -> list[str]:
    """Foldable BNs left inside the submodules that the fallback traced (and replaced by GraphModules)."""
    inputs = first_inputs(result, x)
    graphs = [(name, m) for name, m in result.named_modules() if isinstance(m, fx.GraphModule)]
    return [f"{name}.{bn_name(n)}: {why}" for name, gm in graphs
            for n, why in classify_all(gm, *inputs[name])["foldable"]]


def check_fallback(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, lkfx.Report]:
    with pytest.raises(torch.fx.proxy.TraceError):
        fx.symbolic_trace(copy.deepcopy(model))
    with torch.no_grad():
        ref = model(x)
    expected = foldable_in_traceable_parts(model, x)
    result, report = lkfx.transform(model, ["fold_bn"], example_inputs=x, check=True, return_report=True)
    rep = report["fold_bn"]
    assert "rewrote each traceable submodule" in report.notes[0], report.notes
    assert expected > 0 and rep.rewritten == expected, f"folded {rep.rewritten}, foldable {expected}"
    assert report.check["passed"]
    with torch.no_grad():
        assert rel_error(ref, result(x)) <= TOL
    assert any(isinstance(m, fx.GraphModule) for m in result.modules())
    assert_none_left(foldable_left_in_graph_children(result, x), rep.rewritten)
    assert_accounted(model, rep)
    return result, report


def _untraceable_run():
    model, x = randomize_batchnorm(_Untraceable()).eval(), torch.randn(2, 3, 16, 16)
    return (model, x, *check_fallback(model, x))


def test_untraceable_falls_back_to_submodules() -> None:
    model, x, result, report = _untraceable_run()
    assert report["fold_bn"].rewritten == 3  # stem, stage.0 and head; stage.1 (the gate) is left as it is
    assert {n.split(":")[0] for n in report.notes} >= {"stage", "stage.1"}, report.notes
    assert [name for name, m in result.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["stage.1.bn"]
    assert isinstance(result.stem, fx.GraphModule) and isinstance(result.stage[0], fx.GraphModule)
    assert isinstance(result.stage[1], _Gate)
    with torch.no_grad():
        for inp in (-x, 3 * x):  # both branches of the gate
            assert rel_error(model(inp), result(inp)) <= TOL


def test_untraceable_reason_names_the_module() -> None:
    _, _, _, report = _untraceable_run()
    top = [n for n in report.notes if "cannot trace _Untraceable" in n]
    assert len(top) == 1 and "in stage.1" in top[0], report.notes


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in UNTRACEABLE])
def test_untraceable_zoo_falls_back(spec: ZooModel) -> None:
    check_fallback(build(spec), example_input())
