"""Integer grids and (scale, zero point) from a float range.

Symmetric (weights): signed narrow range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, zero point 0,
``scale = max(|lo|, |hi|) / (2^(b-1) - 1)`` (int8: ``max|x| / 127``).

Asymmetric (activations): unsigned ``[0, 2^b - 1]``, ``scale = (hi - lo) / (2^b - 1)``,
``zero_point = round(-lo / scale)`` (uint8: ``(max - min) / 255``).

The range is first widened to include 0, so 0 is exactly representable (zero padding, ReLU outputs). A zero range
gets the tiny positive scale `MIN_SCALE`, never 0 or NaN. Fake quantization is then
``x_hat = (clamp(round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale``.
"""

from __future__ import annotations

import torch

MIN_SCALE = 1e-8


def quant_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of the integer grid: int8 [-127, 127] when symmetric, uint8 [0, 255] when not."""
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def qparams(lo: torch.Tensor, hi: torch.Tensor, *, bits: int = 8, symmetric: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) for each element of the range ``[lo, hi]``."""
    lo = torch.clamp(torch.as_tensor(lo, dtype=torch.float64), max=0.0)
    hi = torch.clamp(torch.as_tensor(hi, dtype=torch.float64), min=0.0)
    qmin, qmax = quant_range(bits, symmetric)
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero_point = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        zero_point = torch.clamp(qmin - torch.round(lo / scale.clamp(min=MIN_SCALE)), qmin, qmax)
    return scale.clamp(min=MIN_SCALE).to(torch.float32), zero_point.to(torch.int32)
