"""Fake-quant modules: quantize -> dequantize in float, with straight-through gradients.

With scale ``s``, zero point ``z`` and integer grid ``[qmin, qmax]`` (`lkfx.quant.qparams`)::

    fq(x) = (clamp(round(x / s) + z, qmin, qmax) - z) * s

The gradient is 1 where ``x`` lies inside the grid and 0 where it is clamped (straight-through estimator), as
``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` compute it. Those ops export to ONNX
QuantizeLinear / DequantizeLinear only for the full int8 / uint8 grids, so a narrower grid (symmetric
``[-127, 127]``, 4 bits) is a ``clamp`` to ``[(qmin - z) s, (qmax - z) s]`` followed by the full grid: the same
values and gradients, exported as Clip -> QuantizeLinear -> DequantizeLinear. Weights need no clamp: their scale
is ``max|w| / qmax`` per output channel, so ``|w| / s <= qmax`` already.

`FakeQuant` quantizes activations per tensor with a calibrated range (`lkfx.calibrate`), or, in QAT training
mode, a moving average of each batch's min / max (``r <- r + momentum (r_batch - r)``; the batch range is
reduced over processes first under torch.distributed, so every rank keeps the same range).

`ConvBnFakeQuant` is conv + BatchNorm for QAT (seed 004, BN folding with correction). With
``sigma = sqrt(running_var + eps)`` and ``k = gamma / sigma`` per output channel, the int8 conv computes
``conv(x, fq(k W)) + beta + k (b - running_mean)``. Training before `freeze_bn`::

    y = BN_batch(conv(x, fq(k W)) / k + b)
      = conv(x, fq(k W)) * sigma / sigma_B + beta - gamma (mu_B - b) / sigma_B

so the weights are quantized as inference will fold them, while the output is normalised with the batch
statistics (the ``sigma / sigma_B`` correction) and the running statistics keep updating. After `freeze_bn`
(and in eval mode) it is the folded conv with the running statistics, exactly what inference computes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from lkfx.errors import LkfxError
from lkfx.quant.observers import all_reduce
from lkfx.quant.qparams import qparams, quant_range


def _shape_only(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


# torch ships no shape-only (fake) kernels for the fake-quant ops, so torch.export (and the ONNX exporter) fails
# on them as soon as a dimension is dynamic. Output and mask have the input's shape: register that.
for _op in ("_fake_quantize_per_tensor_affine_cachemask_tensor_qparams", "fake_quantize_per_channel_affine_cachemask"):
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{_op}", "Meta"):
        torch.library.register_fake(f"aten::{_op}")(_shape_only)


def _container(qmin: int) -> tuple[int, int]:
    return (-128, 127) if qmin < 0 else (0, 255)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
                  ) -> torch.Tensor:
    """Per-tensor fake quantization onto ``[qmin, qmax]`` (at most 8 bits)."""
    lo, hi = _container(qmin)
    if (qmin, qmax) != (lo, hi):
        zp = zero_point.to(scale.dtype)
        x = torch.clamp(x, (qmin - zp) * scale, (qmax - zp) * scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, lo, hi)


def weight_scale(w: torch.Tensor, bits: int, axis: int | None = 0) -> torch.Tensor:
    """Symmetric scale ``max|w| / qmax`` per channel along `axis`, or one for the tensor (``axis=None``), detached."""
    amax = w.detach().abs().amax(dim=[d for d in range(w.ndim) if d != axis])
    return qparams(-amax, amax, bits=bits, symmetric=True)[0]


def fake_quantize_weight(w: torch.Tensor, bits: int, axis: int | None = 0) -> torch.Tensor:
    """Symmetric fake quantization of a weight, per output channel along `axis` or per tensor (``axis=None``), with
    the STE gradient to `w`."""
    scale = weight_scale(w, bits, axis)
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=w.device)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(w, scale, zero_point, -128, 127)
    return torch.fake_quantize_per_channel_affine(w, scale, zero_point, axis, -128, 127)


class WeightFakeQuant(nn.Module):
    """``w -> fq(w)``, symmetric per channel along `axis` (0: conv / linear output channels; None: per tensor)."""

    def __init__(self, bits: int = 8, axis: int | None = 0):
        super().__init__()
        self.bits, self.axis = bits, axis

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(w, self.bits, self.axis)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, axis={self.axis}"


class FakeQuant(nn.Module):
    """Per-tensor activation fake-quant with a calibrated range (buffers ``lo``, ``hi``, ``scale``, ``zero_point``).

    `method` and `options` choose the observer `lkfx.calibrate` uses; with ``qat=True`` training mode tracks
    the range by moving average (`momentum`) instead. While `observer` is set (during calibration) the module
    only feeds it and passes values through.
    """

    def __init__(self, *, bits: int = 8, symmetric: bool = False, method: str = "percentile",
                 options: dict[str, Any] | None = None, qat: bool = False, momentum: float = 0.01):
        super().__init__()
        self.bits, self.symmetric, self.method, self.qat, self.momentum = bits, symmetric, method, qat, momentum
        self.options = dict(options or {})
        self.qmin, self.qmax = quant_range(bits, symmetric)
        self.register_buffer("lo", torch.tensor(float("nan")))
        self.register_buffer("hi", torch.tensor(float("nan")))
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self.calibrated = False
        self.observer: Any = None
        self.guard: str | None = None  # what the range guard did at the last calibration, if anything

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Quantize ``[lo, hi]`` (widened to include 0) from now on."""
        with torch.no_grad():
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            scale, zero_point = qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        self.calibrated = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.calibrated = not bool(torch.isnan(self.lo))

    def _track(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            both = all_reduce(torch.stack([-lo, hi]), "MAX")
            lo, hi = -both[0], both[1]
        if self.calibrated:
            lo = self.lo + self.momentum * (lo - self.lo)
            hi = self.hi + self.momentum * (hi - self.hi)
        self.set_range(lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
            return x
        if self.qat and self.training:
            self._track(x)
        if not self.calibrated:
            raise LkfxError("fake-quant ranges are not set: run lkfx.calibrate(model, batches) first, or train "
                            "(qat=True) for a step")
        return fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        state = f"[{float(self.lo):.4g}, {float(self.hi):.4g}]" if self.calibrated else "uncalibrated"
        return f"bits={self.bits}, symmetric={self.symmetric}, method={self.method!r}, qat={self.qat}, {state}"


class ConvBnFakeQuant(nn.Module):
    """conv + BatchNorm for QAT: fake-quantized folded weights, batch-statistics correction until `freeze_bn`."""

    def __init__(self, conv: nn.Module, bn: nn.Module, bits: int = 8, per_channel: bool = True):
        super().__init__()
        self.conv, self.bn, self.bits, self.axis = conv, bn, bits, 0 if per_channel else None
        self.frozen = False

    def freeze_bn(self) -> None:
        """Stop updating the BN statistics and compute the folded conv (as in eval mode) from now on."""
        self.frozen = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv, bn = self.conv, self.bn
        shape = (-1,) + (1,) * (conv.weight.ndim - 1)
        k = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            k = k * bn.weight
        w = fake_quantize_weight(conv.weight * k.reshape(shape), self.bits, self.axis)
        if self.training and not self.frozen:
            y = conv._conv_forward(x, w, None) / k.reshape((1, -1) + shape[2:])
            if conv.bias is not None:
                y = y + conv.bias.reshape((1, -1) + shape[2:])
            return bn(y)
        b = -bn.running_mean if conv.bias is None else conv.bias - bn.running_mean
        b = b * k if bn.bias is None else b * k + bn.bias
        return conv._conv_forward(x, w, b)


def freeze_bn(model: nn.Module) -> int:
    """`ConvBnFakeQuant.freeze_bn` on every fused QAT conv in `model`; returns how many."""
    fused = [m for m in model.modules() if isinstance(m, ConvBnFakeQuant)]
    for m in fused:
        m.freeze_bn()
    return len(fused)
