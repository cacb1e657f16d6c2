"""benchmarks/dwconv_gpu.py without a GPU: its FLOP count (taps that touch the image) and its refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "dwconv_gpu.py"
sys.path.insert(0, str(SCRIPT.parent))
import dwconv_gpu  # noqa: E402


@pytest.mark.parametrize("size, k", [(16, 3), (16, 31), (32, 29), (7, 13)])
def test_useful_flops_count_the_taps_that_touch_the_image(size, k):
    taps = F.conv2d(torch.ones(1, 1, size, size, dtype=torch.float64), torch.ones(1, 1, k, k, dtype=torch.float64),
                    padding=k // 2).sum().item()
    assert dwconv_gpu.useful_flops(2, 3, size, k) == 2 * 2 * 3 * int(taps)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the benchmark would run")
def test_refuses_without_cuda():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
