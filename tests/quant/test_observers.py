"""Observers on known distributions, qparams, histogram merging, bad options."""

import math

import pytest
import torch

from lkfx.errors import LkfxError
from lkfx.quant.observers import METHODS, make_observer
from lkfx.quant.qparams import qparams, quant_range


def test_quant_range():
    assert quant_range(8, True) == (-127, 127)
    assert quant_range(4, True) == (-7, 7)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(4, False) == (0, 15)


def test_qparams_asymmetric_symmetric_and_per_channel():
    scale, zp = qparams(torch.tensor(-1.0), torch.tensor(3.0))
    assert scale.dtype == torch.float32 and zp.dtype == torch.int32
    assert scale.item() == pytest.approx(4 / 255) and zp.item() == round(1 / (4 / 255))
    scale, zp = qparams(torch.tensor([-2.0, 0.0]), torch.tensor([1.0, 0.5]), symmetric=True)
    assert scale.tolist() == pytest.approx([2 / 127, 0.5 / 127]) and zp.tolist() == [0, 0]
    scale, zp = qparams(torch.tensor(2.0), torch.tensor(5.0))  # widened to include 0
    assert scale.item() == pytest.approx(5 / 255) and zp.item() == 0
    scale, zp = qparams(torch.tensor(0.0), torch.tensor(0.0), bits=4, symmetric=True)  # zero range
    assert scale.item() > 0 and math.isfinite(scale.item()) and zp.item() == 0


def test_minmax_and_ema():
    o = make_observer("minmax", axis=0)
    o.update(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
    o.update(torch.tensor([[-5.0, 0.0], [0.0, 1.0]]))
    lo, hi = o.range()
    assert lo.tolist() == [-5.0, 0.0] and hi.tolist() == [1.0, 4.0]
    e = make_observer("ema", momentum=0.5)
    e.update(torch.tensor([0.0, 2.0]))
    e.update(torch.tensor([-2.0, 4.0]))
    assert [v.item() for v in e.range()] == [-1.0, 3.0]


def test_percentile_of_known_sample():
    x = torch.linspace(0, 1, 100_001)  # percentile p of a uniform grid is p / 100
    for p in (99.0, 99.9, 99.99):
        o = make_observer("percentile", percentile=p)
        o.update(x)
        assert o.range()[1].item() == pytest.approx(p / 100, abs=1 / 4096 + 1e-6)
    o = make_observer("percentile", percentile=99.0)  # signed, asymmetric: both tails
    o.update(torch.linspace(-2, 1, 300_001))
    lo, hi = o.range()
    assert lo.item() == pytest.approx(-2 + 0.03, abs=1e-3) and hi.item() == pytest.approx(1 - 0.03, abs=1e-3)


@pytest.mark.parametrize("method", ["kl", "symmetric_kl", "js", "mse"])
def test_search_clips_a_heavy_tail(method):
    torch.manual_seed(0)
    x = torch.distributions.StudentT(2.0).sample((200_000,)).abs()  # heavy tail: a few huge values
    o = make_observer(method)
    o.update(x)
    hi = o.range()[1].item()
    assert hi < 0.95 * x.max().item()  # the cut-off is below the max
    assert hi > torch.quantile(x[:100_000], 0.9).item()  # and above the bulk of the data


def test_search_keeps_a_bounded_distribution():
    x = torch.rand(200_000) * 3  # uniform: clipping only loses information
    for method in ("kl", "mse"):
        o = make_observer(method)
        o.update(x)
        assert o.range()[1].item() > 0.9 * 3


@pytest.mark.parametrize("method", ["percentile", "kl", "js", "mse"])
def test_histogram_merging_is_order_independent(method):
    batches = [torch.randn(5000) * s for s in (0.1, 3.0, 1.0, 20.0)]
    a, b, c = (make_observer(method) for _ in range(3))
    for x in batches:
        a.update(x)
    for x in reversed(batches):
        b.update(x)
    halves = [make_observer(method), make_observer(method)]
    for x in batches[:2]:
        halves[0].update(x)
    for x in batches[2:]:
        halves[1].update(x)
    c.merge(halves[1])
    c.merge(halves[0])
    for o in (b, c):
        assert o.exponent == a.exponent
        assert torch.equal(o.counts, a.counts) and o.zeros == a.zeros
        assert [v.item() for v in o.range()] == [v.item() for v in a.range()]


def test_histogram_counts_everything():
    x = torch.randn(10_000)
    o = make_observer("kl")
    o.update(x)
    o.update(x * 100)
    assert o.counts.sum().item() == 20_000


def test_symmetric_and_four_bit():
    x = torch.randn(50_000)
    o = make_observer("mse", bits=4, symmetric=True)
    o.update(x)
    lo, hi = o.range()
    assert lo.item() == -hi.item()
    scale, zp = o.qparams()
    assert zp.item() == 0 and scale.item() == pytest.approx(hi.item() / 7)


def test_bad_methods_and_options():
    with pytest.raises(LkfxError, match="valid methods: minmax"):
        make_observer("entropie")
    with pytest.raises(LkfxError, match="valid options"):
        make_observer("kl", num_bins=10)
    with pytest.raises(LkfxError, match="percentile"):
        make_observer("percentile", percentile=120)
    with pytest.raises(LkfxError, match="bits"):
        make_observer("minmax", bits=16)
    with pytest.raises(LkfxError, match="per tensor"):
        make_observer("kl", axis=0)
    with pytest.raises(LkfxError, match="seen no data"):
        make_observer("kl").range()
    with pytest.raises(LkfxError, match="NaN"):
        make_observer("kl").update(torch.tensor([1.0, float("nan")]))


def test_every_method_gives_a_valid_range():
    x = torch.randn(20_000) * 2 + 0.5
    for method in METHODS:
        o = make_observer(method)
        o.update(x)
        lo, hi = o.range()
        assert x.min().item() - 1e-6 <= lo.item() <= 0 <= hi.item() <= x.max().item() + 1e-6, method
        scale, zp = o.qparams()
        assert scale.item() > 0 and 0 <= zp.item() <= 255


# Property tests of the range searches on synthetic families, next to onnxruntime's entropy calibrator
# (TensorRT's algorithm, 2048 bins) on the same data.
SEARCHES = ("kl", "symmetric_kl", "js", "mse")


def _families() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 100_000
    return {
        "relu6 spike at the clip value": torch.clamp(torch.relu(torch.randn(n, generator=g) * 3), max=6),
        "exponential bulk + spike at the max": torch.cat([torch.empty(n).exponential_(generator=g) * 0.3,
                                                          torch.full((n // 20,), 6.0)]),
        "discrete levels (upscaled 4-bit images)": (torch.randint(0, 17, (n,), generator=g).float() / 16) ** 3 * 6,
        "bimodal, 5% in a far mode": torch.cat([torch.randn(n, generator=g), torch.randn(n // 20, generator=g) + 20]),
        "near constant": 3 + 1e-4 * torch.randn(n, generator=g),
    }


def _ort_entropy(x: torch.Tensor) -> tuple[float, float]:
    import contextlib
    import io

    from onnxruntime.quantization.calibrate import HistogramCollector

    c = HistogramCollector("entropy", False, 2048, 128, 99.99, "same")
    with contextlib.redirect_stdout(io.StringIO()):
        c.collect({"t": [x.numpy()]})
        lo, hi = c.compute_collection_result()["t"][:2]
    return float(lo), float(hi)


@pytest.mark.parametrize("method", SEARCHES)
@pytest.mark.parametrize("family", list(_families()))
def test_search_never_clips_a_share_of_the_mass(method, family):
    """Spikes at the clip value, bimodal data and near-constant tensors: the range keeps (almost) everything, as
    onnxruntime's entropy calibrator does on the same data, and never clips more than MAX_CLIPPED."""
    from lkfx.quant.observers import MAX_CLIPPED

    x = _families()[family]
    o = make_observer(method)
    for chunk in x.split(30_000):
        o.update(chunk)
    lo, hi = (v.item() for v in o.range())
    assert o.clipped <= MAX_CLIPPED
    ort_lo, ort_hi = _ort_entropy(x)
    w = 2.0**o.exponent
    assert hi >= min(ort_hi, x.max().item()) - 0.05 * (x.max().item() - min(x.min().item(), 0)) - w
    assert lo <= max(ort_lo, 0.0) + w
    if "spike" in family or "discrete" in family:
        assert hi == pytest.approx(6.0)  # the ceiling where the mass piles up is kept exactly


@pytest.mark.parametrize("method", ["kl", "symmetric_kl", "js"])
def test_entropy_search_still_clips_a_long_tail(method):
    """A heavy tail is still cut (that is what the entropy methods are for), by at most MAX_CLIPPED of the mass."""
    from lkfx.quant.observers import MAX_CLIPPED

    x = torch.distributions.StudentT(2.0).sample((200_000,)).abs()
    o = make_observer(method)
    o.update(x)
    hi = o.range()[1].item()
    assert hi < 0.5 * x.max().item()
    assert 0 < o.clipped <= MAX_CLIPPED and o.guard is None


def test_guard_keeps_the_widest_nearly_best_range():
    """choose(): the best score clips half the mass: not chosen; the widest range within TOLERANCE is."""
    import numpy as np

    from lkfx.quant.observers import TOLERANCE, choose

    h = np.ones(100)
    windows = np.array([(0, 50), (0, 80), (0, 99), (0, 100)])
    scores = np.array([1.0, 1.5, 2.0, 2.0 * (1 + TOLERANCE / 2)])
    kept, best, clipped = choose(h, windows, scores)
    assert (best, kept) == (0, 3) and clipped[best] == pytest.approx(0.5) and clipped[kept] == 0
    o = make_observer("kl")  # the observer says when it overruled the search
    o.update(torch.rand(1000))
    o.range()
    assert o.guard is None


def test_histogram_is_exact_and_dtype_preserving():
    """Counts equal floor(x / w) binning, float64 and float16 inputs, exact zeros counted, NaN / inf refused."""
    x = torch.randn(50_000, dtype=torch.float64)
    x[:100] = 0
    o = make_observer("kl")
    o.update(x)
    w = 2.0**o.exponent
    ref = torch.bincount((torch.floor(x / w) + o.size).long(), minlength=2 * o.size).double()
    assert torch.equal(o.counts, ref) and o.zeros == 100
    h = make_observer("percentile")
    h.update(x.half())
    assert h.counts.sum().item() == 50_000
    for bad in (float("inf"), float("-inf"), float("nan")):
        with pytest.raises(LkfxError, match="NaN or infinite"):
            make_observer("kl").update(torch.tensor([1.0, bad, 2.0]))


@pytest.mark.parametrize("method", ["kl", "symmetric_kl"])
def test_group_sums_equal_bin_by_bin_sums(method):
    """The O(levels) kl / symmetric_kl scoring equals the bin-by-bin definition (`_divergences`), clipped mass,
    empty bins and signed windows included."""
    import numpy as np

    from lkfx.quant.observers import _divergences, _kl_divergences

    rng = np.random.default_rng(0)
    h = rng.poisson(np.exp(-np.linspace(-3, 3, 3000) ** 2) * 50).astype(float)
    h[rng.integers(0, 3000, 300)] = 0
    h[[0, 2999]] = 1
    a = np.array([0, 0, 100, 700, 1000, 0])
    b = np.array([3000, 2500, 2900, 2300, 1256, 256])
    want, got = _divergences(h, a, b, 256, method), _kl_divergences(h, a, b, 256, method)
    assert np.isfinite(want).sum() >= 2
    assert np.allclose(got, want, rtol=1e-9, atol=1e-12) and np.array_equal(np.isinf(got), np.isinf(want))
