"""`make gpu-check` (scripts/gpu_check.py) where no GPU is: it refuses at once with one line and exit 2, checks its
arguments, shows its install step in a dry run, finds wheels for what is missing (or says how to get them), and
reads the JUnit report and the benchmarks' goals it summarises. The CUDA tests themselves are collected and skipped
here, with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))
import gpu_check  # noqa: E402


def run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **env}, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the check would run")
def test_refuses_without_cuda(tmp_path):
    done = run("--out", str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert done.returncode == 2
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1
    assert "no CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_bad_arguments():
    done = run("--budget", "10")
    assert done.returncode == 2 and "at least 60 seconds" in done.stderr
    assert run("--no-such-flag").returncode == 2


def test_dry_run_shows_the_install_and_runs_nothing(tmp_path):
    done = run("--dry-run", "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    assert f"--no-build-isolation -e {ROOT}" in done.stdout and "--no-index" in done.stdout
    assert not (tmp_path / "out").exists()


def test_missing_packages_come_from_the_wheels_folder(tmp_path):
    wheel = tmp_path / "onnx_graphsurgeon-0.6.1-py2.py3-none-any.whl"
    wheel.write_bytes(b"")
    site = tmp_path / "site"
    commands, problems = gpu_check.install_commands(["onnx_graphsurgeon", "tqdm"], tmp_path, site)
    assert commands[0][-2:] == [str(site), str(wheel)] and "--no-index" in commands[0]
    assert commands[-1][-2:] == ["-e", str(ROOT)]
    assert len(problems) == 1 and "tqdm" in problems[0] and "make gpu-wheels" in problems[0]


def test_summary_reads_junit_and_goals(tmp_path):
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={junit}", "tests/cuda"], cwd=ROOT, capture_output=True, timeout=300,
                   env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    files = gpu_check.pytest_results(junit)
    assert {f for f, _, _ in files} >= {"tests/cuda/test_dwconv_cuda.py", "tests/cuda/test_fft_conv_cuda.py",
                                        "tests/cuda/test_compile_cuda.py"}
    assert all(not ok and " 0 passed" not in detail and detail.startswith("0 passed") for _, ok, detail in files)

    (tmp_path / "a.json").write_text(json.dumps({"goals": {"x >= 2": True, "y": False}}))
    (tmp_path / "b.json").write_text(json.dumps({"goals": [{"goal": "K=31 10x", "passed": True}]}))
    assert gpu_check.benchmark_goals(tmp_path / "a.json") == [("x >= 2", True), ("y", False)]
    assert gpu_check.benchmark_goals(tmp_path / "b.json") == [("K=31 10x", True)]
    assert gpu_check.benchmark_goals(tmp_path / "none.json") == []
