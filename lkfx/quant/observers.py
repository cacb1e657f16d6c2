"""Observers: range estimators that watch tensors and pick the float range to quantize.

``minmax``: the running min / max (per channel with ``axis``). ``ema``: a moving average of each batch's min / max,
``r <- (1 - momentum) r + momentum r_batch`` (QAT). The others read a histogram:

``percentile``: the ``percentile``-th value of |x| (symmetric) or the (100 - p)-th and p-th values (asymmetric),
interpolated linearly inside a bin.

``kl``, ``symmetric_kl``, ``js``, ``mse``: a search over clipping ranges. Symmetric quantization (and asymmetric
quantization of non-negative data) searches a threshold ``T`` on the |x| histogram; signed data under asymmetric
quantization searches ``[r min, r max]``. Candidates are ``s * max`` for ``s`` from ``search_start_scale`` to
``search_end_scale`` in steps of ``search_step`` (snapped to bin edges; the defaults 0.0625 .. 1 match TensorRT's
entropy calibrator, whose first cut-off is bin 128 of 2048). For each candidate window of ``n`` bins the reference
``P`` is the histogram inside it with the clipped outliers added to its end bins, and ``Q`` spreads the mass of
each of ``L`` equal groups of the window's own bins (without the outliers, as TensorRT does) evenly over the
group's non-zero bins (``L`` = the number of integer levels the window maps to,
128 for int8 symmetric as in TensorRT, 256 for uint8). Windows narrower than ``L`` bins are not tried (Q would equal
P). With ``p, q`` normalised::

    kl            KL(P || Q) = sum p log(p / q)
    symmetric_kl  (KL(P || Q) + KL(Q || P)) / 2
    js            (KL(P || M) + KL(Q || M)) / 2,  M = (P + Q) / 2
    mse           sum over all bins of count * (c - fake_quant(c))^2, c the bin centre

Exact zeros (a ReLU output's spike, padding) are left out of the searches: every grid represents 0 exactly, and
the spike, spread over its group of bins by ``Q``, would otherwise dominate the divergence (TensorRT's
calibrator likewise overwrites bin 0 with bin 1).

The histogram keeps negative and positive values on a grid anchored at 0 whose bin width is a power of two,
the smallest for which max|x| spans at most ``2 * bins`` bins (so at least ``bins`` bins cover the data). A batch
with a larger range doubles the width (adjacent bins are summed, which is exact), so histograms of any batches
merge exactly and in any order, and `all_reduce` across processes gives the histogram of all the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lkfx.errors import LkfxError
from lkfx.quant.qparams import qparams, quant_range

METHODS = ("minmax", "ema", "percentile", "kl", "symmetric_kl", "js", "mse")
OPTIONS: dict[str, Any] = {"percentile": 99.99, "bins": 2048, "search_start_scale": 0.0625, "search_end_scale": 1.0,
                           "search_step": 0.001, "momentum": 0.01}


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(t: torch.Tensor, op: str = "SUM") -> torch.Tensor:
    """`t` reduced over all processes (MIN, MAX or SUM), on the device the process group's backend needs."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    buf = t.to(device, copy=True)
    dist.all_reduce(buf, op=getattr(dist.ReduceOp, op))
    return buf.to(t.device)


class Observer:
    """Accumulates statistics of the tensors given to `update`; `range()` is the chosen (lo, hi)."""

    def __init__(self, *, bits: int = 8, symmetric: bool = False, axis: int | None = None):
        self.bits, self.symmetric, self.axis = bits, symmetric, axis

    def update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def merge(self, other: Observer) -> None:
        """Add what `other` (same method and settings) has seen."""
        raise NotImplementedError

    def all_reduce(self) -> None:
        """Combine the statistics of every process (no-op unless torch.distributed is initialised)."""
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.range()
        return qparams(lo, hi, bits=self.bits, symmetric=self.symmetric)

    def _batch_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if self.axis is None:
            return x.min(), x.max()
        flat = x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)
        return flat.min(1).values, flat.max(1).values

    def _require_data(self, seen: bool) -> None:
        if not seen:
            raise LkfxError(f"{type(self).__name__} has seen no data; run calibration data through the model first")


class MinMaxObserver(Observer):
    def __init__(self, **kw: Any):
        super().__init__(**kw)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        lo, hi = self._batch_range(x)
        self._add(lo, hi)

    def _add(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def merge(self, other: Observer) -> None:
        if other.lo is not None:
            self._add(other.lo, other.hi)

    def all_reduce(self) -> None:
        if _distributed():
            self._require_data(self.lo is not None)
            self.lo, self.hi = all_reduce(self.lo, "MIN"), all_reduce(self.hi, "MAX")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.lo is not None)
        return self.lo.clone(), self.hi.clone()


class EmaObserver(Observer):
    """Moving average of batch min / max; the first batch sets the range."""

    def __init__(self, *, momentum: float, **kw: Any):
        super().__init__(**kw)
        self.momentum = momentum
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        self.update_range(*self._batch_range(x))

    def update_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """One step with a batch range computed elsewhere (e.g. reduced across processes first)."""
        if self.lo is None:
            self.lo, self.hi = lo.clone(), hi.clone()
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)
        self.count += 1

    def merge(self, other: Observer) -> None:
        """Average the two ranges, weighted by the number of batches each has seen."""
        if other.lo is None:
            return
        if self.lo is None:
            self.lo, self.hi, self.count = other.lo.clone(), other.hi.clone(), other.count
            return
        total = self.count + other.count
        self.lo = (self.lo * self.count + other.lo * other.count) / total
        self.hi = (self.hi * self.count + other.hi * other.count) / total
        self.count = total

    def all_reduce(self) -> None:
        """The mean range over processes."""
        if _distributed():
            self._require_data(self.lo is not None)
            both = all_reduce(torch.stack([self.lo, self.hi])) / torch.distributed.get_world_size()
            self.lo, self.hi = both[0], both[1]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.lo is not None)
        return self.lo.clone(), self.hi.clone()


class HistogramObserver(Observer):
    """Histogram on a power-of-two grid anchored at 0 (see the module docstring); per tensor only."""

    def __init__(self, method: str, *, bins: int, percentile: float, search_start_scale: float,
                 search_end_scale: float, search_step: float, **kw: Any):
        super().__init__(**kw)
        self.method, self.size, self.percentile = method, 2 * bins, percentile
        self.scales = np.arange(search_start_scale, search_end_scale + search_step / 2, search_step)
        self.exponent: int | None = None  # bin width is 2 ** exponent
        self.pos = torch.zeros(self.size, dtype=torch.float64)  # pos[k]: x in [k w, (k+1) w)
        self.neg = torch.zeros(self.size, dtype=torch.float64)  # neg[k]: x in [-(k+1) w, -k w)
        self.zeros = torch.zeros(1, dtype=torch.float64)  # exact zeros (also counted in pos[0])
        self.lo = math.inf
        self.hi = -math.inf

    def _exponent_for(self, amax: float) -> int:
        """Smallest e with amax < size * 2^e (the value amax must fall in a bin below `size`)."""
        if amax <= 0:
            return -126
        e = math.ceil(math.log2(amax / self.size))
        while amax >= self.size * 2.0**e:
            e += 1
        while amax < self.size * 2.0 ** (e - 1):
            e -= 1
        return max(e, -126)

    def _coarsen(self, counts: torch.Tensor, steps: int) -> torch.Tensor:
        """Counts on a grid 2^steps times coarser: bin k goes to bin k >> steps (exact, both signs)."""
        if steps <= 0:
            return counts
        target = torch.arange(self.size) >> min(steps, 62)
        return counts.new_zeros(self.size).index_add_(0, target, counts)

    def _rebin(self, exponent: int) -> None:
        if self.exponent is not None:
            self.pos = self._coarsen(self.pos, exponent - self.exponent)
            self.neg = self._coarsen(self.neg, exponent - self.exponent)
        self.exponent = exponent

    def update(self, x: torch.Tensor) -> None:
        if self.axis is not None:
            raise LkfxError(f"observer '{self.method}' is per tensor; use 'minmax' or 'ema' for per-channel ranges")
        x = x.detach().reshape(-1).double()
        if x.numel() == 0:
            return
        if not torch.isfinite(x).all():
            raise LkfxError(f"observer '{self.method}' got NaN or infinite values")
        lo, hi = float(x.min()), float(x.max())
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self._rebin(max(self.exponent if self.exponent is not None else -126, self._exponent_for(max(-lo, hi))))
        w = 2.0**self.exponent
        pos, neg = x[x >= 0], -x[x < 0]
        self.pos += torch.bincount(torch.floor(pos / w).long(), minlength=self.size).cpu().double()
        self.zeros += (pos == 0).sum().item()
        self.neg += torch.bincount(torch.ceil(neg / w).long() - 1, minlength=self.size).cpu().double()

    def merge(self, other: Observer) -> None:
        if other.exponent is None:
            return
        self._rebin(max(other.exponent, self.exponent if self.exponent is not None else other.exponent))
        self.pos += other._coarsen(other.pos, self.exponent - other.exponent)
        self.zeros += other.zeros
        self.neg += other._coarsen(other.neg, self.exponent - other.exponent)
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def all_reduce(self) -> None:
        if not _distributed():
            return
        self._require_data(self.exponent is not None)
        e = all_reduce(torch.tensor([self.exponent, -self.lo, self.hi], dtype=torch.float64), "MAX")
        self._rebin(int(e[0]))
        self.lo, self.hi = -float(e[1]), float(e[2])
        counts = all_reduce(torch.cat([self.pos, self.neg, self.zeros]))
        self.pos, self.neg, self.zeros = counts[: self.size], counts[self.size: 2 * self.size], counts[-1:]

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.exponent is not None)
        w = 2.0**self.exponent
        pos, neg = self.pos.numpy().copy(), self.neg.numpy()
        if self.method != "percentile":
            pos[0] -= float(self.zeros)  # 0 is exact on every grid: a ReLU's spike of zeros must not pick the range
        qmin, qmax = quant_range(self.bits, self.symmetric)
        signed = not self.symmetric and self.lo < 0
        if self.method == "percentile":
            lo, hi = self._percentile_range(pos, neg, w, signed)
        elif signed:
            h = np.concatenate([neg[::-1], pos])
            nneg, npos = math.ceil(-self.lo / w), math.ceil(self.hi / w)
            windows = [(self.size - math.ceil(s * nneg), self.size + math.ceil(s * npos)) for s in self.scales]
            a, b = self._search(h, windows, qmax - qmin + 1, w, self.size)
            lo, hi = (a - self.size) * w, (b - self.size) * w
        else:
            h = pos + neg
            amax = max(-self.lo, self.hi)
            levels = qmax + 1 if self.symmetric else qmax - qmin + 1
            _, t = self._search(h, [(0, math.ceil(s * amax / w)) for s in self.scales], levels, w, 0)
            hi = t * w
            lo = -hi if self.symmetric else 0.0
        lo, hi = max(lo, min(self.lo, 0.0)), min(hi, max(self.hi, 0.0))
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def _percentile_range(self, pos: np.ndarray, neg: np.ndarray, w: float, signed: bool) -> tuple[float, float]:
        p = self.percentile / 100
        if not signed:
            hi = _quantile(pos + neg, p) * w
            return (-hi if self.symmetric else 0.0), hi
        h = np.concatenate([neg[::-1], pos])
        return (_quantile(h, 1 - p) - self.size) * w, (_quantile(h, p) - self.size) * w

    def _search(self, h: np.ndarray, windows: list[tuple[int, int]], levels: int, w: float, zero: int
                ) -> tuple[int, int]:
        """The window [a, b) of bins of `h` with the smallest divergence (bin `zero` starts at value 0)."""
        pad = max(b for _, b in windows) - len(h)
        low = max(0, -min(a for a, _ in windows))
        h = np.concatenate([np.zeros(low), h, np.zeros(max(pad, 0))])
        zero += low
        centres = (np.arange(len(h)) - zero + 0.5) * w
        best, best_window = math.inf, None
        for a, b in dict.fromkeys(windows):
            a, b = a + low, b + low
            if self.method != "mse" and b - a < levels:
                continue
            d = _mse(h, centres, (a - zero) * w, (b - zero) * w, levels) if self.method == "mse" \
                else _divergence(h, a, b, levels, self.method)
            if d < best:
                best, best_window = d, (a - low, b - low)
        if best_window is None:  # every window narrower than the grid: nothing is lost by keeping the full range
            best_window = max(windows, key=lambda ab: ab[1] - ab[0])
        return best_window


def _quantile(h: np.ndarray, p: float) -> float:
    """Position (in bins, fractional) below which a fraction p of the histogram's mass lies."""
    cdf = np.cumsum(h)
    target = p * cdf[-1]
    k = min(int(np.searchsorted(cdf, target, side="left")), len(h) - 1)
    before = cdf[k - 1] if k > 0 else 0.0
    return k + (target - before) / h[k] if h[k] > 0 else float(k)


def _divergence(h: np.ndarray, a: int, b: int, levels: int, method: str) -> float:
    """Divergence between P (window with clipped mass in its end bins) and Q (the window's own bins, each group's
    mass spread over its non-zero bins; the clipped mass is not in Q, as in TensorRT). Infinite when P has mass
    where Q has none (kl, symmetric_kl)."""
    raw = h[a:b]
    p = raw.copy()
    p[0] += h[:a].sum()
    p[-1] += h[b:].sum()
    group = (np.arange(b - a) * levels) // (b - a)
    nonzero = raw > 0
    mass = np.bincount(group, raw, minlength=levels)
    support = np.bincount(group, nonzero, minlength=levels)
    q = np.where(nonzero, mass[group] / np.maximum(support[group], 1), 0.0)
    keep = (p > 0) | nonzero
    p, q = p[keep] / p.sum(), q[keep] / q.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        if method == "js":
            m = (p + q) / 2
            return float((np.sum(p * np.log(p / m), where=p > 0) + np.sum(q * np.log(q / m), where=q > 0)) / 2)
        if np.any((p > 0) != (q > 0)):
            return math.inf
        kl = float(np.sum(p * np.log(p / q)))
        return kl if method == "kl" else (kl + float(np.sum(q * np.log(q / p)))) / 2


def _mse(h: np.ndarray, centres: np.ndarray, lo: float, hi: float, levels: int) -> float:
    scale = max((hi - lo) / (levels - 1), 1e-30)
    zp = np.round(-lo / scale)
    deq = (np.clip(np.round(centres / scale) + zp, 0, levels - 1) - zp) * scale
    return float(np.sum(h * (centres - deq) ** 2))


def make_observer(method: str, *, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                  **options: Any) -> Observer:
    """An observer for `method` (one of `METHODS`). Options (any of `OPTIONS`; each method reads its own):
    ``percentile`` (percentile), ``bins`` (histogram methods), ``search_start_scale`` / ``search_end_scale`` /
    ``search_step`` (kl, symmetric_kl, js, mse), ``momentum`` (ema)."""
    if method not in METHODS:
        raise LkfxError(f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise LkfxError(f"unknown observer option(s) {', '.join(map(repr, unknown))}; valid options: "
                        + ", ".join(f"{k}={v!r}" for k, v in OPTIONS.items()))
    o = {**OPTIONS, **options}
    if not (isinstance(bits, int) and 2 <= bits <= 8):
        raise LkfxError(f"bits must be an integer from 2 to 8 (ONNX QuantizeLinear is 8-bit), got {bits!r}")
    if not 0 < o["percentile"] <= 100:
        raise LkfxError(f"percentile must be in (0, 100], got {o['percentile']!r}")
    if not (float(o["bins"]).is_integer() and o["bins"] >= 16):
        raise LkfxError(f"bins must be an integer >= 16, got {o['bins']!r}")
    if not 0 < o["search_start_scale"] <= o["search_end_scale"] or o["search_step"] <= 0:
        raise LkfxError("need 0 < search_start_scale <= search_end_scale and search_step > 0, got "
                        f"{o['search_start_scale']!r}, {o['search_end_scale']!r}, {o['search_step']!r}")
    if not 0 < o["momentum"] <= 1:
        raise LkfxError(f"momentum must be in (0, 1], got {o['momentum']!r}")
    kw = {"bits": bits, "symmetric": symmetric, "axis": axis}
    if method == "minmax":
        return MinMaxObserver(**kw)
    if method == "ema":
        return EmaObserver(momentum=o["momentum"], **kw)
    if axis is not None:
        raise LkfxError(f"observer '{method}' is per tensor; use 'minmax' or 'ema' for per-channel ranges")
    return HistogramObserver(method, bins=int(o["bins"]), percentile=o["percentile"],
                             search_start_scale=o["search_start_scale"], search_end_scale=o["search_end_scale"],
                             search_step=o["search_step"], **kw)
