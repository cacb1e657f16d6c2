"""The KernelWarehouse digits example, run as a user would: static vs KW(1/2x) vs KW(1x), both KW models within
one point of the static baseline's accuracy."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kernel_warehouse_digits.py"


def test_kernel_warehouse_digits_example():
    res = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    rows = {m.group(1): [float(v) for v in m.group(2).split()]
            for m in re.finditer(r"^(static|KW\(1/2x\)|KW\(1x\))\s+([\d. ]+)$", res.stdout, re.M)}
    assert set(rows) == {"static", "KW(1/2x)", "KW(1x)"}, res.stdout
    (params, kernels, attention, acc, _), kw1 = rows["static"], rows["KW(1x)"]
    assert attention == 0 and kernels < params and kw1[1] == kernels  # budget 1: as many kernel parameters
    assert kernels / 2 < rows["KW(1/2x)"][1] < 0.51 * kernels  # half, plus the static stem
    assert kw1[3] >= acc - 1.0 and rows["KW(1/2x)"][3] >= acc - 1.0
    assert "PASS" in res.stdout
