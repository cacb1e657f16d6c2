"""merge_reparam conformance on timm's reparameterisable models (random weights, random BN statistics).

Oracle: timm's own ``reparameterize_model`` gives the deploy form; lkfx must reach as many convs, exactly.

* FX, module route: ``transform(model, ["merge_reparam", "fold_bn"], check=True)`` calls each block's own
  ``reparameterize()`` / ``fuse()`` (the blocks are traced as leaves), matches eager to 1e-5, leaves no BatchNorm
  and as many convs as timm's deploy form (fastvit: timm keeps 10 ConvMlp BatchNorms, fold_bn folds them).
* FX, graph route: the same on a GraphModule the user traced (no blocks left to call): the generic rule alone
  merges the sums of branches (FastViT's RepMixer ``x + ls * (mixer(x) - norm(x))`` included).
* ONNX: the model exported in train form (branches and BatchNormalization kept), then
  ``lkfx optimize -p fold_bn -p merge_reparam --check``: exit 0, one Conv per conv of timm's deploy form, no Add of
  branches left, no BatchNormalization next to a Conv (RepViT's classifier keeps BN1d -> Gemm, which fold_bn's
  ONNX rule does not fold), outputs equal in onnxruntime.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from zoo_models import REPARAM, ZooModel, build, example_input, export_onnx

import lkfx
import lkfx.cli

TOL = 1e-5


def rel_error(ref, out) -> float:
    ref, out = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
    assert ref.shape == out.shape
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def timm_deploy_convs(model: nn.Module) -> int:
    from timm.utils.model import reparameterize_model

    return count(reparameterize_model(model), nn.Conv2d)


def check_fx(model: nn.Module, source: nn.Module, x: torch.Tensor) -> lkfx.Report:
    with torch.no_grad():
        ref = model(x)
    out, report = lkfx.transform(source, ["merge_reparam", "fold_bn"], example_inputs=(x,), check=True,
                                 return_report=True)
    with torch.no_grad():
        assert torch.equal(model(x), ref), "transform changed the caller's model"
        assert rel_error(ref, out(x)) <= TOL
    assert report.check["passed"]
    assert report["merge_reparam"].skipped == [] and report["merge_reparam"].rewritten > 0
    assert count(out, nn.modules.batchnorm._BatchNorm) == 0
    assert count(out, nn.Conv2d) == timm_deploy_convs(model)
    return report


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in REPARAM])
def test_fx_module_protocol(spec: ZooModel) -> None:
    model = build(spec)
    report = check_fx(model, model, example_input())
    blocks = report["merge_reparam"].notes
    assert blocks and all("merged by its own" in n for n in blocks), blocks


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in REPARAM])
def test_fx_generic_rule(spec: ZooModel) -> None:
    model = build(spec)
    report = check_fx(model, fx.symbolic_trace(copy.deepcopy(model)), example_input())
    assert all(n.startswith("merged ") and "by its own" not in n for n in report["merge_reparam"].notes)


def ops(proto: onnx.ModelProto, op: str) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type == op]


def _op(producers: dict, tensor: str) -> str | None:
    return producers[tensor].op_type if tensor in producers else None


def mergeable_adds(proto: onnx.ModelProto) -> list[str]:
    """Adds of two branches of one tensor: two Convs reading it, or a Conv reading the other operand."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    left = []
    for n in ops(proto, "Add"):
        convs = [producers[i] for i in n.input if _op(producers, i) == "Conv"]
        reads = [c.input[0] for c in convs]
        if len(convs) == 2 and reads[0] == reads[1] or any(r in n.input for r in reads):
            left.append(n.name)
    return left


@pytest.mark.parametrize("spec", [pytest.param(s, id=s.id) for s in REPARAM])
def test_onnx_train_form_cli(spec: ZooModel, tmp_path: Path) -> None:
    model, x = build(spec), example_input()
    src, dst, report_path = tmp_path / "train.onnx", tmp_path / "deploy.onnx", tmp_path / "report.json"
    export_onnx(model, x, src)
    before = onnx.load(str(src))
    assert len(ops(before, "BatchNormalization")) > len(ops(before, "Conv")) // 2, "the export folded the BNs"
    args = ["optimize", str(src), "-o", str(dst), "-p", "fold_bn", "-p", "merge_reparam", "--check",
            "--report", str(report_path)]
    assert lkfx.cli.main(args) == 0
    after = onnx.load(str(dst))
    onnx.checker.check_model(after, full_check=True)
    assert len(ops(after, "Conv")) == timm_deploy_convs(model)
    producers = {o: n for n in after.graph.node for o in n.output}
    assert not [n.name for n in ops(after, "BatchNormalization") if _op(producers, n.input[0]) == "Conv"]
    assert not mergeable_adds(after)
    report = json.loads(report_path.read_text())
    merge = next(p for p in report["passes"] if p["name"] == "merge_reparam")
    assert merge["rewritten"] > 0 and merge["skipped"] == []
    assert report["check"]["passed"] and report["check"]["max_rel_error"] <= TOL
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, dst)]
    feeds = {sessions[0].get_inputs()[0].name: x.numpy()}
    assert rel_error(sessions[0].run(None, feeds)[0], sessions[1].run(None, feeds)[0]) <= TOL
