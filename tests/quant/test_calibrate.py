"""lkfx.calibrate: ranges from batches, bad input refused before any work, DDP equals one process."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import lkfx
from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import FakeQuant

METHODS = ("minmax", "percentile", "kl")


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 5)).eval()


def batches(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 6, 6, generator=gen) * (1 + i) for i in range(n)]


def ranges(model):
    return {name: (m.lo.item(), m.hi.item()) for name, m in model.named_modules() if isinstance(m, FakeQuant)}


def test_calibrate_sets_ranges_and_restores_mode():
    q = lkfx.transform(small_model(), ["fake_quant"])
    data = batches()
    q.train()
    assert lkfx.calibrate(q, data, method="minmax") is q
    assert q.training  # mode restored
    r = ranges(q)
    assert len(r) == 3  # inputs of the two convs and of the linear
    first = r[next(iter(r))]
    assert first == pytest.approx((min(b.min().item() for b in data), max(b.max().item() for b in data)))
    lkfx.calibrate(q, data, method="minmax", num_batches=1)
    assert ranges(q)[next(iter(r))] == pytest.approx((data[0].min().item(), data[0].max().item()))


def test_transform_calibrates_with_calib_data():
    data = batches()
    q = lkfx.transform(small_model(), [("fake_quant", {"method": "minmax", "num_batches": 2})], calib_data=data)
    first = ranges(q)[next(iter(ranges(q)))]
    assert first == pytest.approx((min(b.min().item() for b in data[:2]), max(b.max().item() for b in data[:2])))
    with torch.no_grad():
        ref, out = small_model()(data[0]), q(data[0])
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize(("data", "match"), [
    (torch.randn(8, 3, 6, 6), "iterable of batches"),
    ("batches.npz", "not a path"),
    ([], "no batches"),
    ([torch.randn(8, 3, 6, 6), torch.randn(8, 3, 7, 6)], "does not match batch 0"),
    ([torch.randint(0, 5, (8, 3, 6, 6))], "non-float"),
    (["x"], "not a tensor"),
    ([torch.randn(8, 5, 6, 6)], "does not fit the model"),
    ([(torch.randn(8, 3, 6, 6), torch.randn(8))], "takes 1 inputs"),
])
def test_bad_calibration_data_is_refused_before_any_work(data, match):
    q = lkfx.transform(small_model(), ["fake_quant"])
    before = {k: v.clone() for k, v in q.state_dict().items()}
    with pytest.raises(LkfxError, match=match):
        lkfx.calibrate(q, data)
    after = q.state_dict()
    assert all(torch.equal(before[k], after[k]) or torch.isnan(before[k]).all() for k in before)
    assert not any(m.calibrated or m.observer is not None for m in q.modules() if isinstance(m, FakeQuant))


def test_too_few_batches_and_no_quantizers():
    q = lkfx.transform(small_model(), ["fake_quant"])
    with pytest.raises(LkfxError, match="only 4 batches"):
        lkfx.calibrate(q, batches(), num_batches=5)
    with pytest.raises(LkfxError, match="no fake-quant modules"):
        lkfx.calibrate(small_model(), batches())


def _ddp_worker(rank, world, init, data, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = {}
        for method in METHODS:
            q = lkfx.transform(small_model(), [("fake_quant", {"method": method})])
            lkfx.calibrate(q, data[rank::world])
            result[method] = ranges(q)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch: ~10 s on 2 cores
def test_ddp_calibration_equals_single_process(tmp_path):
    data = batches(6)
    single = {}
    for method in METHODS:
        q = lkfx.transform(small_model(), [("fake_quant", {"method": method})])
        lkfx.calibrate(q, data)
        single[method] = ranges(q)
    out = tmp_path / "ranges.pt"
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'init'}", data, str(out)), nprocs=2)
    assert torch.load(out) == single  # exactly: min/max and summed histograms on one grid
