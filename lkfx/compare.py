"""Numeric comparison used by `check=True` and the tests.

The error of one output is ``max|out - ref| / max|ref|`` (max-normalised: element-wise relative error is
meaningless where the reference crosses zero). Integer and bool outputs must be equal.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def max_rel_error(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> float:
    if len(ref) != len(out):
        return float("inf")
    worst = 0.0
    for r, o in zip(ref, out, strict=True):
        r, o = np.asarray(r), np.asarray(o)
        if r.shape != o.shape:
            return float("inf")
        if not np.issubdtype(r.dtype, np.floating):
            worst = max(worst, 0.0 if np.array_equal(r, o) else float("inf"))
            continue
        r64, o64 = r.astype(np.float64), o.astype(np.float64)
        if not (np.isfinite(r64).all() and np.isfinite(o64).all()):
            same = np.array_equal(np.isnan(r64), np.isnan(o64)) and np.allclose(r64, o64, equal_nan=True)
            worst = max(worst, 0.0 if same else float("inf"))
            continue
        scale = float(np.abs(r64).max()) if r64.size else 0.0
        err = float(np.abs(o64 - r64).max()) if r64.size else 0.0
        worst = max(worst, err / scale if scale > 0 else err)
    return worst
