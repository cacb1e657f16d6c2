"""The zoo conformance suite's CI subset (`lkfx.zoo.FAST`, every case) and the runner itself.

The full run is one command, ``python -m lkfx.zoo`` (its table is in the README). Here: each fast model through
every case, with no failure and the cells that must pass passing; the command line writes its JSON and Markdown;
a pass that is not registered skips with that reason; an error in a case is a failure cell with the error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import lkfx
from lkfx.zoo import CASES, FAST, Case, Subject, get, run_cell, run_zoo, table

ROOT = Path(__file__).resolve().parents[2]

# Cells that must pass on each fast model (the others pass or skip with a reason, never fail).
MUST_PASS = {
    "tv-resnet18": {"fx:fold_bn", "fx:kernel_warehouse", "fx:fft_conv", "onnx:fold_bn", "onnx:fft_conv"},
    "tv-mobilenet_v3_small": {"fx:fold_bn", "fx:replk+merge", "fx:kernel_warehouse", "fx:fake_quant",
                              "fx:lower_dwconv", "onnx:fold_bn", "onnx:lower_dwconv"},
    "timm-repvgg_a0": {"fx:fold_bn", "fx:merge_reparam", "onnx:fold_bn", "onnx:merge_reparam"},
    "timm-convnext_atto": {"fx:replk+merge", "fx:kernel_warehouse"},
    "timm-efficientvit_m0": {"fx:fold_bn", "onnx:fold_bn"},
}


def test_fast_subset_is_covered() -> None:
    assert set(MUST_PASS) == set(FAST)


@pytest.mark.parametrize("model_id", FAST)
def test_fast_model(model_id: str) -> None:
    row = run_zoo([get(model_id)], CASES, progress=False)[model_id]
    failed = {name: cell.detail for name, cell in row.items() if cell.status == "fail"}
    assert not failed, failed
    not_passed = {name: row[name].detail for name in MUST_PASS[model_id] if row[name].status != "pass"}
    assert not not_passed, not_passed
    available = {p["name"] for p in lkfx.list_passes()}
    for case in CASES:
        cell = row[case.name]
        assert cell.detail, f"{case.name}: a cell without its detail"
        if not set(case.passes) <= available:
            assert cell.status == "skip" and cell.detail.startswith("pass not available")
    if not get(model_id).traceable:  # kernel_warehouse has no per-submodule fallback
        cell = row["fx:kernel_warehouse"]
        assert cell.status == "skip" and "needs the whole graph" in cell.detail and "cannot trace" in cell.detail


def test_unavailable_pass_and_failing_case(tmp_path: Path) -> None:
    subject = Subject(get("tv-resnet18"), tmp_path)
    missing = run_cell(subject, Case("fx:nope", ("no_such_pass",), lambda s: "ran", ""))
    assert (missing.status, missing.detail) == ("skip", "pass not available: no_such_pass")

    def broken(s: Subject) -> str:
        raise ValueError("boom")

    failed = run_cell(subject, Case("fx:broken", ("fold_bn",), broken, ""))
    assert failed.status == "fail" and failed.detail.startswith("ValueError: boom (test_zoo_conformance.py:")


def test_table_numbers_reasons() -> None:
    from lkfx.zoo import Cell

    results = {"a": {"c1": Cell("pass", "x"), "c2": Cell("skip", "why")},
               "b": {"c1": Cell("fail", "err"), "c2": Cell("skip", "why")}}
    text = table(results, markdown=True)
    assert "| a | pass | skip (1) |" in text and "| b | FAIL (2) | skip (1) |" in text
    assert "1. skip: why" in text and "2. FAIL: err" in text
    assert "2 models x 2 cases: 1 pass, 2 skip, 1 fail" in text


def test_command_line(tmp_path: Path) -> None:
    out_json, out_md = tmp_path / "zoo.json", tmp_path / "zoo.md"
    proc = subprocess.run([sys.executable, "-m", "lkfx.zoo", "--models", "tv-resnet18", "--passes", "fx:fold_bn",
                           "onnx:fold_bn", "--json", str(out_json), "--markdown", str(out_md)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 models x 2 cases: 2 pass, 0 skip, 0 fail" in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["counts"] == {"pass": 2, "skip": 0, "fail": 0}
    assert data["results"]["tv-resnet18"]["onnx:fold_bn"]["detail"].startswith("fold_bn 20;")
    assert "| tv-resnet18 | pass | pass |" in out_md.read_text()


def test_command_line_unknown_model() -> None:
    proc = subprocess.run([sys.executable, "-m", "lkfx.zoo", "--models", "tv-nope"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "no zoo model 'tv-nope'" in proc.stderr
