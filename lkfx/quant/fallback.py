"""``fallback="auto"``: which quantized layers to keep in float, the same search on both frontends.

With ``error(float_layers)`` the output error ``||y_int8 - y||_2 / ||y||_2`` over the calibration batches when the
layers in ``float_layers`` read their weight and input unquantized: measure each layer quantized alone (all the
others float), then keep the worst in float one by one until the error is at most ``bound``. Greedy: n + k + 1
evaluations for n layers of which k are kept, not an optimal subset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lkfx.errors import LkfxError


def check_options(config: dict[str, Any]) -> None:
    """Refuse a ``fallback`` / ``fallback_bound`` pair the search cannot run with."""
    if config["fallback"] not in ("none", "auto"):
        raise LkfxError(f"fake_quant fallback must be 'none' or 'auto', got {config['fallback']!r}")
    if not (isinstance(config["fallback_bound"], (int, float)) and config["fallback_bound"] > 0):
        raise LkfxError(f"fake_quant fallback_bound must be a number > 0, got {config['fallback_bound']!r}")


def float_layers(candidates: Sequence[str], error: Callable[[set[str]], float],
                 bound: float) -> tuple[dict[str, str], str]:
    """({layer kept in float: why}, the report note)."""
    start = error(set())
    if start <= bound:
        return {}, f"fallback=auto: output error {start:.4f} <= fallback_bound={bound}: every layer quantized"
    if not candidates:
        return {}, f"fallback=auto: output error {start:.4f} > {bound}, no layer left"
    alone = {k: error(set(candidates) - {k}) for k in candidates}
    kept: dict[str, str] = {}
    err = start
    for k in sorted(candidates, key=alone.get, reverse=True):
        kept[k] = f"quantized alone it moves the output by {alone[k]:.4f}"
        err = error(set(kept))
        if err <= bound:
            break
    return kept, (f"fallback=auto: output error {start:.4f} -> {err:.4f} (fallback_bound={bound}) with "
                  f"{len(kept)} layer(s) kept in float: {', '.join(sorted(kept))}")


def relative_error(got: Sequence, expected: Sequence) -> float:
    """``||got - expected||_2 / ||expected||_2`` over pairs of arrays or tensors, in float64."""
    num = sum(float(((g - e) ** 2).sum()) for g, e in zip(got, expected, strict=True))
    return (num / max(sum(float((e**2).sum()) for e in expected), 1e-30)) ** 0.5
