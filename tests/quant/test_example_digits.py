"""examples/quantize_digits.py run as a user would: PTQ with every method and QAT, int8 within half a point of
fp32 with at least one method."""

import re
import subprocess
import sys
from pathlib import Path

from lkfx.quant.observers import METHODS

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quantize_digits.py"


def test_quantize_digits_example():
    res = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = re.findall(r"^(fp32|PTQ int8|QAT int8 \(\d+ epochs\))\s+(\S+)\s+([\d.]+)$", res.stdout, re.M)
    assert [r[1] for r in rows] == ["-", *METHODS, "ema"], res.stdout
    acc = [float(r[2]) for r in rows]
    fp32, ptq, qat = acc[0], acc[1:-1], acc[-1]
    assert fp32 > 95
    assert max(ptq) >= fp32 - 0.5
    assert all(a >= fp32 - 5 for a in ptq)
    assert qat >= fp32 - 1.0
