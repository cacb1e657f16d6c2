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
