"""Zoo conformance: real timm and torchvision CNNs (random weights, small inputs) through every pass.

    python -m lkfx.zoo [--models ID ...] [--passes CASE ...] [--fast] [--json FILE] [--markdown FILE]

Each model of `MODELS` is built with random weights and random BatchNorm statistics (nothing is downloaded), run
on a 2 x 3 x 64 x 64 batch, and put through each case of `CASES`: a pass or a chain on torch.fx, or the CLI
(``lkfx optimize ... --check``) on the model's ONNX export with BatchNormalization kept (opset 20, the
TorchScript exporter without constant folding, in training-preserving mode, so nothing is folded before lkfx
sees it). Every cell is one of:

- ``pass``: exact passes: the output equals the original's within the passes' tolerance (`lkfx.compare`,
  max relative error) and the caller's model is unchanged; other cases as their row of `CASES` says;
- ``skip``: with the reason: the pass is not available, torch.fx cannot trace the model as a whole and the pass
  needs the whole graph, or the pass ran, changed nothing and the output is still equal (nothing to rewrite);
- ``fail``: with the error.

A pass that is not registered (``lkfx.list_passes()``) makes its cells ``skip: pass not available``; a new case
is one `Case` row. timm and torchvision are imported only when a model is built (``pip install 'lkfx[dev]'``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

import lkfx
from lkfx.errors import LkfxError

INPUT_SHAPE = (2, 3, 64, 64)
ONNX_OPSET = 20  # fft_conv's DFT subgraph needs 20; every other pass takes it too


@dataclass(frozen=True)
class ZooModel:
    library: str  # "torchvision" | "timm"
    name: str
    has_batchnorm: bool = True
    traceable: bool = True  # torch.fx can trace the whole model
    note: str = ""

    @property
    def id(self) -> str:
        return f"{'tv' if self.library == 'torchvision' else 'timm'}-{self.name}"


def _tv(name: str, **kw: Any) -> ZooModel:
    return ZooModel("torchvision", name, **kw)


def _timm(name: str, **kw: Any) -> ZooModel:
    return ZooModel("timm", name, **kw)


MODELS: tuple[ZooModel, ...] = (
    _tv("resnet18"),
    _tv("resnet50"),
    _tv("resnext50_32x4d", note="grouped 3x3 convs"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small"),
    _tv("efficientnet_b0"),
    _tv("regnet_x_400mf"),
    _tv("regnet_y_400mf", note="squeeze-excitation"),
    _tv("densenet121", note="BN -> ReLU -> conv: pre-activation BNs cannot fold"),
    _tv("shufflenet_v2_x0_5", note="channel shuffle"),
    _tv("mnasnet0_5"),
    _tv("vgg11_bn"),
    _tv("googlenet", note="inception branches concatenated"),
    _tv("squeezenet1_0", has_batchnorm=False, note="no BatchNorm"),
    _tv("convnext_tiny", has_batchnorm=False, note="7x7 depthwise, LayerNorm"),
    _timm("convnext_atto", has_batchnorm=False, note="LayerNorm only: zero folds, still exact"),
    _timm("convnextv2_atto", has_batchnorm=False, note="global response norm"),
    _timm("repvgg_a0", note="BatchNormAct2d; identity-branch BNs have no conv next to them"),
    _timm("mobileone_s0", note="BatchNormAct2d; identity-branch BNs"),
    _timm("fastvit_t8", note="MobileOne-style reparam blocks, RepMixer BNs"),
    _timm("repvit_m1", note="RepViT reparam blocks"),
    _timm("repghostnet_050", note="RepGhost reparam blocks"),
    _timm("ghostnet_100", note="plain BatchNorm2d plus one BatchNormAct2d"),
    _timm("resnet18d", note="deep stem, avg-pool downsample"),
    _timm("resnet26t", note="tiered deep stem"),
    _timm("efficientnet_b0", note="BatchNormAct2d, traced into F.batch_norm"),
    _timm("regnetx_002", note="BatchNormAct2d"),
    _timm("mobilenetv4_conv_small"),
    _timm("lcnet_050"),
    _timm("mixnet_s", note="mixed depthwise kernel sizes (split + concat)"),
    _timm("rexnet_100"),
    _timm("res2net50_14w_8s", note="hierarchical split residuals"),
    _timm("skresnet18", note="selective-kernel attention over branches"),
    _timm("ese_vovnet19b_dw"),
    _timm("dla34", note="deep layer aggregation"),
    _timm("cspresnet50", note="cross-stage partial"),
    _timm("hgnetv2_b0"),
    _timm("gernet_s"),
    _timm("inception_next_atto", note="split depthwise bands"),
    _timm("mobilevitv2_050", traceable=False, note="MobileVitV2Block branches on the feature-map size"),
    _timm("efficientvit_m0", traceable=False,
          note="window attention branches on H == W == window; parent reads self.attn.resolution"),
)

# A handful of models that cover the cases quickly: what CI runs (`--fast`, tests/zoo/).
FAST = ("tv-resnet18", "tv-mobilenet_v3_small", "timm-repvgg_a0", "timm-convnext_atto", "timm-efficientvit_m0")


def get(model_id: str) -> ZooModel:
    for spec in MODELS:
        if spec.id == model_id:
            return spec
    raise LkfxError(f"no zoo model '{model_id}'; known: {', '.join(s.id for s in MODELS)}")


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm random running statistics and affine parameters (in place), so no fold is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def build(spec: ZooModel, seed: int = 0) -> nn.Module:
    """The model with random weights and random BN statistics, in eval mode. Nothing is downloaded."""
    torch.manual_seed(seed)
    try:
        if spec.library == "torchvision":
            import torchvision.models as tvm

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # googlenet's note on its weight initialisation
                model = tvm.get_model(spec.name, weights=None)
        else:
            import timm

            model = timm.create_model(spec.name, pretrained=False)
    except ModuleNotFoundError as e:
        raise LkfxError(f"the zoo needs {e.name} to build {spec.id}: pip install 'lkfx[dev]'") from e
    return randomize_batchnorm(model, seed).eval()


def example_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def export_onnx(model: nn.Module, x: torch.Tensor, path: str | Path, opset: int = 17) -> None:
    """Export with BatchNormalization and parallel branches kept: no constant folding, training-preserving mode
    (an eval model stays eval), the TorchScript exporter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.PRESERVE, opset_version=opset)


# --- cases --------------------------------------------------------------------------------------------------
class Skip(Exception):
    """A cell that does not apply, with the reason."""


@dataclass
class Subject:
    """One model under test: built once, its reference output and ONNX export computed on first use."""

    spec: ZooModel
    folder: Path
    model: nn.Module = field(init=False)
    x: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.model, self.x = build(self.spec), example_input()

    @cached_property
    def reference(self) -> list:
        return _outputs(self.model, self.x)

    @cached_property
    def onnx_path(self) -> Path:
        return _export(self.model, self.x, self.folder / f"{self.spec.name}.onnx", ONNX_OPSET)


@dataclass(frozen=True)
class Case:
    """A column: `run(subject)` returns what it showed, or raises `Skip`; any other exception is a failure."""

    name: str
    passes: tuple[str, ...]  # every one must be registered, else the cell is "skip: pass not available"
    run: Callable[[Subject], str]
    what: str


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> Path:
    try:
        export_onnx(model, x, path, opset)
    except Exception as e:  # the exporter raises many kinds of errors; not lkfx's
        raise Skip(f"torch.onnx.export failed: {_one_line(e)}") from e
    return path


def _outputs(model: nn.Module, x: torch.Tensor) -> list:
    from lkfx.graph.fx import flat_outputs

    with torch.no_grad():
        return flat_outputs(model(x))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _tolerance(passes: Sequence[Any]) -> float:
    from lkfx.passes import resolve_passes

    return max(p.tolerance for p in resolve_passes(passes))


def _transform(s: Subject, model: nn.Module, passes: list) -> tuple[nn.Module, lkfx.Report]:
    from lkfx.graph.fx import TraceError

    try:
        return lkfx.transform(model, passes, example_inputs=s.x, return_report=True)
    except TraceError as e:
        if s.spec.traceable:
            raise
        raise Skip(f"needs the whole graph: {e}") from e


def _rewritten(report: lkfx.Report) -> str:
    return ", ".join(f"{p.name} {p.rewritten}" for p in report.passes)


def _assert_equal(ref: list, model: nn.Module, x: torch.Tensor, tol: float) -> float:
    from lkfx.compare import max_rel_error

    err = max_rel_error(ref, _outputs(model, x))
    if not err <= tol:
        raise AssertionError(f"max relative error {err:.3g} > tolerance {tol:g}")
    return err


def _nothing_done(skipped: list[tuple[str, str]]) -> Skip:
    """The pass ran, the output is still equal, and it rewrote nothing: say what it refused, if anything."""
    if not skipped:
        return Skip("nothing to rewrite (ran, output unchanged)")
    where, reason = skipped[0]
    return Skip(f"nothing rewritten: {len(skipped)} candidates refused, e.g. {where}: {reason}")


def _refused(report: lkfx.Report) -> list[tuple[str, str]]:
    return [(s.where, s.reason) for s in report.passes[0].skipped]


def fx_exact(*passes: Any) -> Callable[[Subject], str]:
    """Exact FX passes: the output equals the original's, the caller's model is unchanged."""

    def run(s: Subject) -> str:
        return _fx_exact(s, passes)[0]

    return run


def _fx_exact(s: Subject, passes: Sequence[Any]) -> tuple[str, lkfx.Report]:
    out, report = _transform(s, s.model, list(passes))
    err = _assert_equal(s.reference, out, s.x, _tolerance(passes))
    _assert_equal(s.reference, s.model, s.x, 0.0)
    if not report.passes[0].modified:
        raise _nothing_done(_refused(report))
    return f"{_rewritten(report)}; err {err:.1e}", report


def bn_accounting(total: int, rewritten: int, skipped: Sequence[tuple[str, str]]) -> str:
    """Every BatchNorm is folded or skipped with a reason that names it: folded + skipped == BNs in the model.
    `skipped` is (node, reason) per refusal (a BN refused by both rules appears twice)."""
    named = {node for node, _ in skipped}
    if "" in named or not all(reason for _, reason in skipped):
        raise AssertionError("a fold_bn refusal without the BatchNorm it is about or without a reason")
    if rewritten + len(named) != total:
        raise AssertionError(f"{total} BatchNorms, {rewritten} folded + {len(named)} skipped with a reason")
    return f"{total} BN = {rewritten} folded + {len(named)} skipped"


def fx_fold_bn(s: Subject) -> str:
    """fx_exact("fold_bn"), and every BatchNorm module of the model accounted for (`bn_accounting`)."""
    total = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in s.model.modules())
    detail, report = _fx_exact(s, ["fold_bn"])
    pr = report["fold_bn"]
    return f"{detail}; {bn_accounting(total, pr.rewritten, [(x.node, x.reason) for x in pr.skipped])}"


def fx_replk_merge(s: Subject) -> str:
    """Swap depthwise convs for 13x13 + 5x5 RepLK blocks (preserving init: equal), then merge them (equal)."""
    swapped, rep = _transform(s, s.model, [("reparam_large_kernel", {"kernel_size": 13})])
    tol = _tolerance(["reparam_large_kernel", "merge_reparam"])
    _assert_equal(s.reference, swapped, s.x, tol)
    if not rep.modified:
        raise _nothing_done(_refused(rep))
    merged, rep2 = _transform(s, swapped, ["merge_reparam"])
    err = _assert_equal(s.reference, merged, s.x, tol)
    blocks = rep["reparam_large_kernel"].rewritten
    left = sum(type(m).__name__ == "ReparamLargeKernelConv" for m in merged.modules())
    if left:
        raise AssertionError(f"{left} of {blocks} RepLK blocks left after merge_reparam")
    return f"{blocks} swapped, merged {rep2['merge_reparam'].rewritten}; err {err:.1e}"


def fx_kernel_warehouse(s: Subject) -> str:
    """Budget 1: at tau = 1 the model equals the original; at tau = 0.5 a training step's forward and backward
    run and every parameter (warehouse cells, attentions) gets a finite gradient."""
    from lkfx.modules.kernel_warehouse import Warehouse

    kw, report = _transform(s, s.model, ["kernel_warehouse"])
    if not report.modified:
        raise _nothing_done(_refused(report))
    err = _assert_equal(s.reference, kw, s.x, _tolerance(["kernel_warehouse"]))
    lkfx.set_temperature(kw, 0.5)
    kw.train()
    loss = sum(torch.as_tensor(o).float().square().mean() for o in _tensors(kw(s.x)))
    loss.backward()
    cells = [w.cells for w in kw.modules() if isinstance(w, Warehouse)]
    bad = [n for n, p in kw.named_parameters() if p.requires_grad and p.grad is not None
           and not torch.isfinite(p.grad).all()]
    if not cells or any(c.grad is None for c in cells) or bad:
        raise AssertionError(f"backward: {len(cells)} warehouses, gradients missing or not finite ({bad[:3]})")
    params = sum(p.numel() for p in kw.parameters()) / 1e6
    return f"{report['kernel_warehouse'].rewritten} convs, {len(cells)} warehouses, {params:.2f} M params; " \
           f"tau=1 err {err:.1e}; backward ok"


def fx_fake_quant(s: Subject) -> str:
    """Fake-quantized model, calibrated on the example batch, runs and exports to ONNX with QuantizeLinear /
    DequantizeLinear pairs (int8 error is by design: not compared)."""
    import onnx

    q, report = _transform(s, s.model, ["fake_quant"])
    lkfx.calibrate(q, [s.x], method="minmax")
    _outputs(q, s.x)
    path = _export(q.eval(), s.x, s.folder / f"{s.spec.name}.qdq.onnx", 17)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    pairs = min(ops.count("QuantizeLinear"), ops.count("DequantizeLinear"))
    if not pairs:
        raise AssertionError("the export has no QuantizeLinear / DequantizeLinear pair")
    return f"{_rewritten(report)}; {pairs} QDQ pairs"


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for v in value for t in _tensors(v)] if isinstance(value, (list, tuple)) else []


def onnx_cli(*specs: str) -> Callable[[Subject], str]:
    """``lkfx optimize MODEL.onnx -o OUT.onnx -p SPEC ... --check``: exit 0 and the report's check passed."""

    def run(s: Subject) -> str:
        return _onnx_cli(s, specs)[0]

    return run


def _onnx_cli(s: Subject, specs: Sequence[str]) -> tuple[str, dict[str, Any]]:
    import lkfx.cli

    src = s.onnx_path
    dst, rep = s.folder / f"{src.stem}.out.onnx", s.folder / f"{src.stem}.report.json"
    args = ["optimize", str(src), "-o", str(dst), *[a for p in specs for a in ("-p", p)], "--check",
            "--report", str(rep), "-q"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = lkfx.cli.main(args)
    if code != 0:
        raise AssertionError(f"exit {code}: {err.getvalue().strip()}")
    report = json.loads(rep.read_text())
    done = ", ".join(f"{p['name']} {p['rewritten']}" for p in report["passes"])
    check = report["check"]
    if not report["passes"][0]["rewritten"]:
        raise _nothing_done([(x["where"], x["reason"]) for x in report["passes"][0]["skipped"]])
    return f"{done}; err {check['max_rel_error']:.1e}", report


def onnx_fold_bn(s: Subject) -> str:
    """onnx_cli("fold_bn"), and every BatchNormalization node of the export accounted for (`bn_accounting`)."""
    import onnx

    total = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(s.onnx_path)).graph.node)
    detail, report = _onnx_cli(s, ["fold_bn"])
    pr = report["passes"][0]
    skipped = [(x.get("node", ""), x["reason"]) for x in pr["skipped"]]
    return f"{detail}; {bn_accounting(total, pr['rewritten'], skipped)}"


CASES: tuple[Case, ...] = (
    Case("fx:fold_bn", ("fold_bn",), fx_fold_bn, "exact; BN modules = folded + skipped with a reason"),
    Case("fx:merge_reparam", ("merge_reparam",), fx_exact("merge_reparam", "fold_bn"),
         "exact; merge_reparam then fold_bn (deploy conversion)"),
    Case("fx:replk+merge", ("reparam_large_kernel", "merge_reparam"), fx_replk_merge,
         "reparam_large_kernel (13x13 + 5x5, preserving init) equal, then merge_reparam equal, no block left"),
    Case("fx:kernel_warehouse", ("kernel_warehouse",), fx_kernel_warehouse,
         "budget 1: equal at tau=1; forward + backward at tau=0.5 with finite gradients"),
    Case("fx:fake_quant", ("fake_quant",), fx_fake_quant, "minmax-calibrated on the batch, runs; ONNX export has QDQ"),
    Case("fx:fft_conv", ("fft_conv",), fx_exact(("fft_conv", {"mode": "always"})),
         "exact; mode=always on global convs (kernel covers the feature map)"),
    Case("fx:lower_dwconv", ("lower_dwconv",), fx_exact(("lower_dwconv", {"min_kernel": 3})),
         "exact; min_kernel=3: every depthwise conv onto lkfx's dwconv2d op (its CPU path here)"),
    Case("onnx:fold_bn", ("fold_bn",), onnx_fold_bn,
         "CLI --check; BatchNormalization nodes = folded + skipped with a reason"),
    Case("onnx:merge_reparam", ("merge_reparam",), onnx_cli("merge_reparam"), "CLI --check"),
    Case("onnx:fft_conv", ("fft_conv",), onnx_cli("fft_conv:mode=always"), "CLI --check; mode=always"),
    Case("onnx:lower_dwconv", ("lower_dwconv",), onnx_cli("lower_dwconv:min_kernel=3"),
         "CLI --check; min_kernel=3 (plugin nodes run in onnxruntime through lkfx's Python op)"),
)


def get_case(name: str) -> Case:
    for case in CASES:
        if case.name == name:
            return case
    raise LkfxError(f"no zoo case '{name}'; known: {', '.join(c.name for c in CASES)}")


# --- running ------------------------------------------------------------------------------------------------
@dataclass
class Cell:
    status: str  # "pass" | "skip" | "fail"
    detail: str
    seconds: float = 0.0


def run_cell(subject: Subject, case: Case) -> Cell:
    available = {p["name"] for p in lkfx.list_passes()}
    missing = [p for p in case.passes if p not in available]
    if missing:
        return Cell("skip", f"pass not available: {', '.join(missing)}")
    start = time.perf_counter()
    try:
        detail, status = case.run(subject), "pass"
    except Skip as e:
        detail, status = str(e), "skip"
    except Exception as e:  # a cell records any failure and the run goes on
        where = traceback.extract_tb(e.__traceback__)[-1]
        detail, status = f"{_one_line(e)} ({Path(where.filename).name}:{where.lineno})", "fail"
    return Cell(status, detail, time.perf_counter() - start)


def run_zoo(models: Sequence[ZooModel], cases: Sequence[Case], progress: bool = True,
            after_model: Callable[[dict[str, dict[str, Cell]]], None] | None = None) -> dict[str, dict[str, Cell]]:
    """{model id: {case name: Cell}}, built model by model (each model once, its export once); `after_model`
    gets the results so far after each model (a long run that is stopped keeps what it did)."""
    from tqdm import tqdm

    results: dict[str, dict[str, Cell]] = {}
    bar = tqdm(total=len(models) * len(cases), disable=not progress, unit="cell")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in models:
            folder = Path(tmp) / spec.id
            folder.mkdir()
            row = results[spec.id] = {}
            try:
                subject = Subject(spec, folder)
            except Exception as e:  # a model that cannot be built fails its whole row
                subject, why = None, f"building the model: {_one_line(e)}"
            for case in cases:
                bar.set_postfix_str(f"{spec.id} {case.name}")
                row[case.name] = run_cell(subject, case) if subject is not None else Cell("fail", why)
                bar.update()
            del subject
            if after_model is not None:
                after_model(results)
    bar.close()
    return results


# --- reporting ----------------------------------------------------------------------------------------------
SHORT = {"pass": "pass", "skip": "skip", "fail": "FAIL"}


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()}, python {platform.python_version()}, "
            f"torch {torch.__version__}")


def to_json(results: dict[str, dict[str, Cell]], cases: Sequence[Case]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "input_shape": list(INPUT_SHAPE),
        "cases": {c.name: c.what for c in cases},
        "models": {spec.id: spec.note for spec in MODELS if spec.id in results},
        "results": {m: {c: vars(cell) | {"seconds": round(cell.seconds, 2)} for c, cell in row.items()}
                    for m, row in results.items()},
        "counts": counts(results),
    }


def counts(results: dict[str, dict[str, Cell]]) -> dict[str, int]:
    out = {"pass": 0, "skip": 0, "fail": 0}
    for row in results.values():
        for cell in row.values():
            out[cell.status] += 1
    return out


def _reasons(results: dict[str, dict[str, Cell]]) -> tuple[dict[tuple[str, str], int], list[str]]:
    """A number for each distinct (status, reason) of skipped and failed cells, in order of appearance."""
    index: dict[tuple[str, str], int] = {}
    for row in results.values():
        for cell in row.values():
            if cell.status != "pass":
                index.setdefault((cell.status, cell.detail), len(index) + 1)
    return index, [f"{n}. {SHORT[s]}: {d}" for (s, d), n in index.items()]


def table(results: dict[str, dict[str, Cell]], markdown: bool = False) -> str:
    """Models x cases: pass / skip (n) / FAIL (n), the numbered reasons below."""
    case_names = list(next(iter(results.values())))
    index, notes = _reasons(results)

    def text(cell: Cell) -> str:
        return "pass" if cell.status == "pass" else f"{SHORT[cell.status]} ({index[(cell.status, cell.detail)]})"

    rows = [["model", *case_names]] + [[m, *(text(row[c]) for c in case_names)] for m, row in results.items()]
    c = counts(results)
    total = f"{len(results)} models x {len(case_names)} cases: {c['pass']} pass, {c['skip']} skip, {c['fail']} fail"
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join([*lines, "", total, "", *notes])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", total, *notes])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lkfx.zoo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", metavar="ID", help=f"model ids (default: all {len(MODELS)})")
    parser.add_argument("--passes", nargs="+", metavar="CASE",
                        help=f"cases (default: all): {', '.join(c.name for c in CASES)}")
    parser.add_argument("--fast", action="store_true", help=f"only the CI subset of models: {', '.join(FAST)}")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every cell with its detail as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the table as Markdown")
    args = parser.parse_args(argv)
    try:
        ids = args.models or (FAST if args.fast else [s.id for s in MODELS])
        models = [get(i) for i in ids]
        cases = [get_case(n) for n in args.passes] if args.passes else list(CASES)
    except LkfxError as e:
        parser.error(str(e))
    def write(results: dict[str, dict[str, Cell]]) -> None:
        data = to_json(results, cases)
        if args.json:
            args.json.write_text(json.dumps(data, indent=1) + "\n")
        if args.markdown:
            args.markdown.write_text(f"Zoo conformance, {data['date']}, {data['machine']}; input "
                                     f"{'x'.join(map(str, INPUT_SHAPE))}, random weights.\n\n"
                                     f"{table(results, markdown=True)}\n")

    results = run_zoo(models, cases, after_model=write)
    print(table(results))
    return 1 if counts(results)["fail"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
