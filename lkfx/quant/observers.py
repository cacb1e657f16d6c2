"""Observers: range estimators that watch tensors and pick the float range to quantize.

``minmax``: the running min / max (per channel with ``axis``). ``ema``: a moving average of each batch's min / max,
``r <- (1 - momentum) r + momentum r_batch`` (QAT). The others read a histogram:

``percentile``: the ``percentile``-th value of |x| (symmetric) or the (100 - p)-th and p-th values (asymmetric),
interpolated linearly inside a bin.

``kl``, ``symmetric_kl``, ``js``, ``mse``: a search over clipping ranges. Symmetric quantization (and asymmetric
quantization of non-negative data) searches a threshold ``T`` on the |x| histogram; signed data under asymmetric
quantization searches ``[r min, r max]``. Candidates are ``s * max`` for ``s`` from ``search_start_scale`` to
``search_end_scale`` in steps of ``search_step``, the end scale always included (each widened to the edge of the bin
holding it, so ``s = 1`` keeps the maximum and any spike of values sitting on it; the defaults 0.0625 .. 1 match
TensorRT's entropy calibrator, whose first cut-off is bin 128 of 2048; steps of 0.5 % of the max move the range by
about one int8 step, finer ones only cost time). For each candidate window of ``n`` bins the reference
``P`` is the histogram inside it with the clipped outliers added to its end bins, and ``Q`` spreads the mass of
each of ``L`` equal groups of the window's own bins (without the outliers, as TensorRT does) evenly over the
group's non-zero bins (``L`` = the number of integer levels the window maps to,
128 for int8 symmetric as in TensorRT, 256 for uint8). Windows narrower than ``L`` bins are not tried (Q would equal
P). With ``p, q`` normalised::

    kl            KL(P || Q) = sum p log(p / q)
    symmetric_kl  (KL(P || Q) + KL(Q || P)) / 2
    js            (KL(P || M) + KL(Q || M)) / 2,  M = (P + Q) / 2
    mse           sum over all bins of count * (c - fake_quant(c))^2, c the bin centre

All candidates are scored at once (numpy, in chunks). The choice is guarded (`choose`): a divergence measured bin
by bin is easily fooled by spiky histograms (upscaled 4-bit images give every channel a few exact values; ReLU6
piles values up at 6): smearing one spike over its group of ``Q`` can cost more than clipping a tenth of the data,
and the search then collapses the range (0..1.1 on a ReLU6 output whose max is 6, 7.8 % of the values clipped). So
ranges clipping more than ``MAX_CLIPPED`` (0.1 %) of the non-zero values are never chosen (the full range always
qualifies), among the rest the widest one scoring within ``TOLERANCE`` (0.1 %, relative) of the best wins, and the
observer's ``guard`` says when the unguarded best range would have clipped more (the pass reports it). A long tail
is still cut (at most 0.1 % of the values), a spike at the clip value, a far second mode and a near-constant tensor
are kept whole, as onnxruntime's / TensorRT's entropy calibrators keep them (tests/quant/test_observers.py).

Exact zeros (a ReLU output's spike, padding) are left out of the searches: every grid represents 0 exactly, and
the spike, spread over its group of bins by ``Q``, would otherwise dominate the divergence (TensorRT's
calibrator likewise overwrites bin 0 with bin 1).

The histogram keeps negative and positive values on a grid anchored at 0 whose bin width is a power of two,
the smallest for which max|x| spans at most ``2 * bins`` bins (so at least ``bins`` bins cover the data). A batch
with a larger range doubles the width (adjacent bins are summed, which is exact), so histograms of any batches
merge exactly and in any order, and `all_reduce` across processes gives the histogram of all the data. An update
reads the batch in its own dtype: min / max (which also catch NaN and infinities), ``floor(x * 2^-e)`` (exact,
a power-of-two scale), one ``bincount``, one count of exact zeros; no float64 copy.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lkfx.errors import LkfxError
from lkfx.quant.qparams import qparams, quant_range

METHODS = ("minmax", "ema", "percentile", "kl", "symmetric_kl", "js", "mse")
ALIASES = {"max": "minmax", "entropy": "kl"}  # the names onnxruntime / ModelOpt use
OPTIONS: dict[str, Any] = {"percentile": 99.99, "bins": 2048, "search_start_scale": 0.0625, "search_end_scale": 1.0,
                           "search_step": 0.005, "momentum": 0.01}
MAX_CLIPPED = 0.001  # a search range clipping more than this share of the (non-zero) values is not chosen
TOLERANCE = 0.001  # scores within this (relative) of the smallest count as equal: the widest range wins


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
        self.scales = np.append(np.arange(search_start_scale, search_end_scale, search_step), search_end_scale)
        self.exponent: int | None = None  # bin width is w = 2 ** exponent
        self.counts = torch.zeros(2 * self.size, dtype=torch.float64)  # [i]: x in [(i - size) w, (i + 1 - size) w)
        self.zeros = 0.0  # exact zeros (also counted in counts[size])
        self.lo = math.inf
        self.hi = -math.inf
        self.clipped = 0.0  # share of the values outside the last range() (0 until range() runs)
        self.guard: str | None = None  # set by range() when the search's best range clipped too much (not chosen)

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
        """Counts on a grid 2^steps times coarser: bin k (from 0) goes to bin k >> steps (exact, both signs)."""
        if steps <= 0:
            return counts
        target = ((torch.arange(2 * self.size) - self.size) >> min(steps, 62)) + self.size
        return counts.new_zeros(2 * self.size).index_add_(0, target, counts)

    def _rebin(self, exponent: int) -> None:
        if self.exponent is not None:
            self.counts = self._coarsen(self.counts, exponent - self.exponent)
        self.exponent = exponent

    def update(self, x: torch.Tensor) -> None:
        """One pass for min / max (NaN and infinities show there: the only finiteness check), the bin index in the
        tensor's own dtype (float32 / float64; others are read as float32) and one `bincount`, one count of exact
        zeros."""
        if self.axis is not None:
            raise LkfxError(f"observer '{self.method}' is per tensor; use 'minmax' or 'ema' for per-channel ranges")
        x = x.detach().reshape(-1)
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise LkfxError(f"observer '{self.method}' got NaN or infinite values")
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self._rebin(max(self.exponent if self.exponent is not None else -126, self._exponent_for(max(-lo, hi))))
        index = torch.floor(x * 2.0**-self.exponent).add_(self.size).int()  # exact: scaling by a power of two
        self.counts += torch.bincount(index, minlength=2 * self.size).cpu().double()
        self.zeros += float((x == 0).sum())

    def merge(self, other: Observer) -> None:
        if other.exponent is None:
            return
        self._rebin(max(other.exponent, self.exponent if self.exponent is not None else other.exponent))
        self.counts += other._coarsen(other.counts, self.exponent - other.exponent)
        self.zeros += other.zeros
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)

    def all_reduce(self) -> None:
        if not _distributed():
            return
        self._require_data(self.exponent is not None)
        e = all_reduce(torch.tensor([self.exponent, -self.lo, self.hi], dtype=torch.float64), "MAX")
        self._rebin(int(e[0]))
        self.lo, self.hi = -float(e[1]), float(e[2])
        counts = all_reduce(torch.cat([self.counts, torch.tensor([self.zeros], dtype=torch.float64)]))
        self.counts, self.zeros = counts[:-1], float(counts[-1])

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_data(self.exponent is not None)
        w, size = 2.0**self.exponent, self.size
        h = self.counts.numpy().copy()
        if self.method != "percentile":
            h[size] -= self.zeros  # 0 is exact on every grid: a ReLU's spike of zeros must not pick the range
        qmin, qmax = quant_range(self.bits, self.symmetric)
        signed = not self.symmetric and self.lo < 0
        if self.method == "percentile":
            p = self.percentile / 100
            if signed:
                lo, hi = (_quantile(h, 1 - p) - size) * w, (_quantile(h, p) - size) * w
            else:
                hi = _quantile(h[size:] + h[size - 1::-1], p) * w
                lo = -hi if self.symmetric else 0.0
        elif signed:
            windows = [(size + math.floor(s * self.lo / w), size + math.floor(s * self.hi / w) + 1)
                       for s in self.scales]
            a, b = self._search(h, windows, qmax - qmin + 1, w, size)
            lo, hi = (a - size) * w, (b - size) * w
        else:
            amax = max(-self.lo, self.hi)
            levels = qmax + 1 if self.symmetric else qmax - qmin + 1
            windows = [(0, math.floor(s * amax / w) + 1) for s in self.scales]  # the bin of s * amax included
            hi = self._search(h[size:] + h[size - 1::-1], windows, levels, w, 0)[1] * w
            lo = -hi if self.symmetric else 0.0
        lo, hi = max(lo, min(self.lo, 0.0)), min(hi, max(self.hi, 0.0))
        edges = (np.arange(2 * size + 1) - size) * w
        counts = self.counts.numpy()
        self.clipped = float(counts[(edges[:-1] > hi) | (edges[1:] <= lo)].sum() / max(counts.sum(), 1.0))
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def _search(self, h: np.ndarray, windows: list[tuple[int, int]], levels: int, w: float, zero: int
                ) -> tuple[int, int]:
        """The window [a, b) of bins of `h` to keep (bin `zero` starts at value 0): see `choose`."""
        self.guard = None
        ab = np.array(list(dict.fromkeys(windows)), dtype=np.int64).reshape(-1, 2)
        if self.method == "mse":
            nz = h > 0
            centres = (np.flatnonzero(nz) - zero + 0.5) * w
            scores = _mse(h[nz], centres, (ab[:, 0] - zero) * w, (ab[:, 1] - zero) * w, levels)
        else:
            wide = ab[:, 1] - ab[:, 0] >= levels
            if not wide.any():  # every window narrower than the grid: nothing is lost by keeping the full range
                return tuple(ab[np.argmax(ab[:, 1] - ab[:, 0])])
            ab = ab[wide]
            if self.method == "js":  # bin-by-bin sums: score only the ranges the guard may choose (the costly part)
                ab = ab[_allowed(h, ab)]
                scores = _divergences(h, ab[:, 0], ab[:, 1], levels, self.method)
            else:
                scores = _kl_divergences(h, ab[:, 0], ab[:, 1], levels, self.method)
        kept, best, clipped = choose(h, ab, scores)
        if clipped[best] > MAX_CLIPPED:
            a, b = (ab[best] - zero) * w
            self.guard = (f"{self.method}'s best range [{a:.4g}, {b:.4g}] clips {clipped[best]:.1%} of the "
                          f"non-zero values; kept the widest range with a score within {TOLERANCE:.0%} among those "
                          f"clipping at most {MAX_CLIPPED:.1%} (clips {clipped[kept]:.2%})")
        return tuple(int(v) for v in ab[kept])


def _quantile(h: np.ndarray, p: float) -> float:
    """Position (in bins, fractional) below which a fraction p of the histogram's mass lies."""
    cdf = np.cumsum(h)
    target = p * cdf[-1]
    k = min(int(np.searchsorted(cdf, target, side="left")), len(h) - 1)
    before = cdf[k - 1] if k > 0 else 0.0
    return k + (target - before) / h[k] if h[k] > 0 else float(k)


def _clipped(h: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Share of the mass of `h` outside each window."""
    cum = np.concatenate([[0.0], np.cumsum(h)])
    return 1 - (cum[windows[:, 1]] - cum[windows[:, 0]]) / max(cum[-1], 1e-300)


def _allowed(h: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """The windows `choose` may keep: clipping at most `MAX_CLIPPED`, or the widest."""
    width = windows[:, 1] - windows[:, 0]
    return (_clipped(h, windows) <= MAX_CLIPPED) | (width == width.max())


def choose(h: np.ndarray, windows: np.ndarray, scores: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(kept, best, clipped): `best` has the smallest score (ties: the widest); `kept` is, among the windows
    clipping at most `MAX_CLIPPED` of the mass of `h` (the widest always qualifies), the widest whose score is
    within `TOLERANCE` (relative) of their smallest; `clipped[j]` is the share of the mass window j clips."""
    clipped = _clipped(h, windows)
    width = windows[:, 1] - windows[:, 0]

    def widest_near(ok: np.ndarray, tolerance: float) -> int:
        low = scores[ok].min()
        near = np.flatnonzero(ok & (scores <= low + tolerance * abs(low)) if np.isfinite(low) else ok)
        return int(near[np.argmax(width[near])])

    kept = widest_near(_allowed(h, windows), TOLERANCE)
    return kept, widest_near(np.ones(len(scores), bool), 0.0), clipped


def _divergences(h: np.ndarray, a: np.ndarray, b: np.ndarray, levels: int, method: str) -> np.ndarray:
    """Divergence between P and Q for each window [a[j], b[j]) of bins (at least `levels` wide), all windows at
    once (in chunks). P: the window's bins with the clipped mass added to its end bins. Q: the window's own bins
    (without the clipped mass, as in TensorRT) cut into `levels` equal groups, each group's mass spread evenly over
    its non-zero bins. Infinite where P has mass and Q none (kl, symmetric_kl)."""
    cum = np.concatenate([[0.0], np.cumsum(h)])
    n = b - a
    out = np.empty(len(a))
    chunk = max(1, (1 << 19) // int(n.max()))
    for k in range(0, len(a), chunk):
        aa, nn = a[k:k + chunk], n[k:k + chunk]
        rows, t = np.arange(len(aa)), np.arange(int(nn.max()))
        valid = t < nn[:, None]
        raw = np.where(valid, h[np.minimum(aa[:, None] + t, len(h) - 1)], 0.0)
        p = raw.copy()
        p[:, 0] += cum[aa]
        p[rows, nn - 1] += cum[-1] - cum[aa + nn]
        group = np.where(valid, t * levels // nn[:, None], levels)  # invalid positions: a dump group
        flat = (rows[:, None] * (levels + 1) + group).ravel()
        nonzero = raw > 0
        mass = np.bincount(flat, raw.ravel(), len(aa) * (levels + 1)).reshape(len(aa), -1)
        support = np.bincount(flat, nonzero.ravel(), len(aa) * (levels + 1)).reshape(len(aa), -1)
        q = np.where(nonzero, np.take_along_axis(mass / np.maximum(support, 1), group, 1), 0.0)
        p /= p.sum(1, keepdims=True)
        q /= np.maximum(q.sum(1, keepdims=True), 1e-300)
        out[k:k + chunk] = _divergence_rows(p, q, method)
    return out


def _kl_divergences(h: np.ndarray, a: np.ndarray, b: np.ndarray, levels: int, method: str) -> np.ndarray:
    """`_divergences` for kl and symmetric_kl with the sums taken group by group: ``q`` is constant on the
    non-zero bins of a group, so with prefix sums of ``h``, ``h log h``, ``log h`` and of the non-zero count, each
    window costs O(levels) instead of O(bins). Same values as the bin-by-bin sums (tests compare them)."""
    def prefix(v: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(v)])

    nz = h > 0
    logh = np.log(np.where(nz, h, 1.0))
    cum, count, hlogh, logs = prefix(h), prefix(nz), prefix(h * logh), prefix(logh)
    total = cum[-1]
    n = (b - a)[:, None]
    edges = a[:, None] + -(-np.arange(levels + 1) * n // levels)  # group g: bins [edges[g], edges[g + 1])
    mass = np.diff(cum[edges], axis=1)
    support = np.diff(count[edges], axis=1)
    inside = cum[b] - cum[a]
    left, right = cum[a], total - cum[b]
    first, last = h[a], h[b - 1]

    def xlogx(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        mass_p = mass.copy()
        mass_p[:, 0] += left
        mass_p[:, -1] += right
        log_q = np.log(mass / np.maximum(support, 1) / np.maximum(inside, 1e-300)[:, None])
        # sum p log p (p = h / total, the clipped mass in the end bins), then sum p log q group by group
        plogp = (hlogh[b] - hlogh[a] + xlogx(first + left) - xlogx(first) + xlogx(last + right) - xlogx(last)) / total \
            - np.log(total)
        kl = plogp - np.where(mass_p > 0, mass_p * log_q, 0.0).sum(1) / total
        kl[((first == 0) & (left > 0)) | ((last == 0) & (right > 0))] = math.inf  # p > 0 where q = 0
        if method == "kl":
            return kl
        # sum q log q - sum q log p: q_g = mass / (support * inside) on each non-zero bin; log p summed per group
        q = np.exp(log_q)
        logp = np.diff(logs[edges], axis=1) - support * np.log(total)
        logp[:, 0] += np.where(first > 0, np.log(np.where(first > 0, (first + left) / first, 1.0)), 0.0)
        logp[:, -1] += np.where(last > 0, np.log(np.where(last > 0, (last + right) / last, 1.0)), 0.0)
        reverse = np.where(mass > 0, mass / np.maximum(inside, 1e-300)[:, None] * log_q - q * logp, 0.0).sum(1)
        return (kl + reverse) / 2


def _divergence_rows(p: np.ndarray, q: np.ndarray, method: str) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lp, lq = np.log(p), np.log(q)
        if method == "js":
            lm = np.log((p + q) / 2)
            return (np.where(p > 0, p * (lp - lm), 0.0).sum(1) + np.where(q > 0, q * (lq - lm), 0.0).sum(1)) / 2
        kl = np.where(p > 0, p * (lp - lq), 0.0).sum(1)  # p > 0 where q = 0: inf
        if method == "kl":
            return kl
        return (kl + np.where(q > 0, q * (lq - lp), 0.0).sum(1)) / 2


def _mse(h: np.ndarray, centres: np.ndarray, lo: np.ndarray, hi: np.ndarray, levels: int) -> np.ndarray:
    """sum h (c - fake_quant(c))^2 over bin centres c, for each range [lo[j], hi[j]] (in chunks)."""
    out = np.empty(len(lo))
    chunk = max(1, (1 << 19) // max(len(h), 1))
    for k in range(0, len(lo), chunk):
        scale = np.maximum((hi[k:k + chunk] - lo[k:k + chunk]) / (levels - 1), 1e-30)[:, None]
        zp = np.round(-lo[k:k + chunk, None] / scale)
        deq = (np.clip(np.round(centres / scale) + zp, 0, levels - 1) - zp) * scale
        out[k:k + chunk] = (h * (centres - deq) ** 2).sum(1)
    return out


def make_observer(method: str, *, bits: int = 8, symmetric: bool = False, axis: int | None = None,
                  **options: Any) -> Observer:
    """An observer for `method` (one of `METHODS`, or an alias in `ALIASES`). Options (any of `OPTIONS`; each
    method reads its own): ``percentile`` (percentile), ``bins`` (histogram methods), ``search_start_scale`` /
    ``search_end_scale`` / ``search_step`` (kl, symmetric_kl, js, mse), ``momentum`` (ema)."""
    method = ALIASES.get(method, method)
    if method not in METHODS:
        raise LkfxError(f"unknown calibration method {method!r}; valid methods: {', '.join(METHODS)} "
                        f"(aliases: {', '.join(f'{a}={m}' for a, m in ALIASES.items())})")
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
