"""KernelWarehouse modules: the cell / m / n arithmetic, beta, the attention function, assembly (a KW conv at
tau = 1 and budget 1 is its static conv), gradients, tau in the state_dict, ONNX export with a dynamic batch,
the temperature schedule, and DistributedDataParallel training on 2 CPU processes (gloo)."""

from __future__ import annotations

import copy
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import TOL, ddp_net, free_port

import lkfx
from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError
from lkfx.modules import kernel_warehouse
from lkfx.modules.kernel_warehouse import (
    KWConv,
    TemperatureSchedule,
    Warehouse,
    convert_convs,
    layout,
    set_temperature,
)

# the reference path: the official code's batch-folded grouped conv, the benchmark's anchor
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from kernel_warehouse import grouped_forward  # noqa: E402

# ResNet18's stage-0 warehouse: layer1's four 3x3 convs, then layer2.0.conv1 and its downsample (handover)
RESNET18_STAGE0 = [(64, 64, 3, 3)] * 4 + [(128, 64, 3, 3), (128, 64, 1, 1)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_rel_error([a.detach().numpy()], [b.detach().numpy()])


def assemble(cells: torch.Tensor, out: int, in_g: int, k: tuple[int, ...]) -> torch.Tensor:
    """A kernel from its m cells laid out in order: mixture index = (tap, out cell, in cell)."""
    co, ci = cells.shape[1], cells.shape[2]
    w = cells.reshape(int(np.prod(k)), out // co, in_g // ci, co, ci)
    return w.permute(1, 3, 2, 4, 0).reshape(out, in_g, *k)


# --- arithmetic ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,cell,m,n", [
    (1, (64, 64), [9, 9, 9, 9, 18, 2], 56),
    (2, (64, 64), [9, 9, 9, 9, 18, 2], 112),
    (4, (64, 64), [9, 9, 9, 9, 18, 2], 224),
    (0.5, (32, 32), [36, 36, 36, 36, 72, 8], 112),  # cells halved in both channels: 4x the mixtures
    (0.25, (32, 32), [36, 36, 36, 36, 72, 8], 56),
])
def test_layout_cells_m_n(budget, cell, m, n):
    lay = layout(RESNET18_STAGE0, budget)
    assert (lay.cell_out, lay.cell_in) == cell
    assert list(lay.m) == m and lay.n == n == int(budget * sum(m))
    # the layers' blocks tile the warehouse in order, each about b m_l cells
    assert lay.start[0] == 0 and sum(lay.size) == n
    assert all(a + q == b for a, q, b in zip(lay.start, lay.size, lay.start[1:], strict=False))
    assert all(abs(q - budget * ml) < 1 for q, ml in zip(lay.size, lay.m, strict=True))
    # the cells hold b times the static kernels' parameters
    assert n * cell[0] * cell[1] == budget * sum(int(np.prod(s)) for s in RESNET18_STAGE0)


def test_layout_gcd_groups_and_ratio():
    # depthwise (in/groups = 1) and grouped convs: the in-cell is the gcd of in/groups
    lay = layout([(96, 1, 3, 3), (144, 1, 3, 3), (144, 1, 5, 5)])
    assert (lay.cell_out, lay.cell_in) == (48, 1) and list(lay.m) == [18, 27, 75]
    # an odd gcd with ratio 1/2: the largest divisor not above gcd / 2
    lay = layout([(30, 45, 1), (15, 15, 1)], 0.5)
    assert (lay.cell_out, lay.cell_in) == (5, 5) and list(lay.m) == [54, 9]
    assert layout([(64, 64, 3, 3)], 1, cell_ratio=0.25).cell_out == 16
    # separate out / in ratios (the official 1/2x MobileNetV2 classifier: all outputs x 1/40 of the inputs)
    lay = layout([(1000, 1280)], 0.5, cell_ratio=(1.0, 1 / 40))
    assert (lay.cell_out, lay.cell_in, lay.m, lay.n) == (1000, 32, (40,), 20)
    # a Linear (out, in) is a 1x1 conv without the 1s: it shares a warehouse with 1x1 convs
    assert layout([(96, 384), (384, 96, 1, 1)]).m == (4, 4)
    with pytest.raises(ValueError, match="leaves no cell"):
        layout([(8, 8, 1, 1)], 0.01)


# --- beta ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [1, 2, 4])
def test_beta_each_mixture_its_own_cell(budget):
    wh = Warehouse(RESNET18_STAGE0, budget)
    lay = wh.layout
    used = []
    for i in range(len(RESNET18_STAGE0)):
        beta = wh.beta(i)
        assert beta.shape == (lay.m[i], lay.n + 1) and (beta.sum(1) == 1).all()
        cells = beta.argmax(1).tolist()
        assert lay.n not in cells  # no mixture starts on the zero cell
        assert cells == [lay.start[i] + budget * j for j in range(lay.m[i])]  # official: start + b i
        used += cells
    assert len(used) == len(set(used))  # distinct over the whole warehouse


@pytest.mark.parametrize("budget", [0.5, 0.25])
def test_beta_one_mixture_in_1_over_b(budget):
    wh = Warehouse(RESNET18_STAGE0, budget)
    lay, r = wh.layout, int(1 / budget)
    used = []
    for i in range(len(RESNET18_STAGE0)):
        cells = wh.beta(i).argmax(1).tolist()
        own = [j for j, c in enumerate(cells) if c != lay.n]
        assert own == [j for j in range(lay.m[i]) if j % r == (j // r) % r]
        assert len(own) == lay.m[i] // r == lay.size[i]
        assert [cells[j] for j in own] == list(range(lay.start[i], lay.start[i] + lay.size[i]))
        used += [cells[j] for j in own]
    assert sorted(used) == list(range(lay.n))  # every cell of the warehouse assigned exactly once


# --- attention and assembly ---------------------------------------------------------------------------------
def kw_pair(budget=1.0, seed=0, **conv):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**{"in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1, **conv})
    (kw,) = convert_convs([conv], budget)
    return conv, kw


def test_attention_is_linear_normalisation_with_negatives():
    _, kw = kw_pair()
    kw.eval().tau.fill_(0.0)
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        alpha = kw.attention(x)
        z = kw.fc2(F.relu(kw.norm(kw.fc1(x.mean((2, 3)))))).reshape(4, kw.m, kw.n + 1)
    expected = z / (z.abs().sum(-1, keepdim=True) + 1e-3)
    assert alpha.shape == (4, kw.m, kw.n)
    assert torch.allclose(alpha, expected[..., :-1], atol=1e-6)
    assert (alpha < 0).any() and (alpha > 0).any()  # not a softmax: negative attention is allowed
    assert (expected.abs().sum(-1) < 1).all()  # per mixture sum |.| = S / (S + 1e-3), zero cell included
    kw.tau.fill_(0.25)
    with torch.no_grad():
        assert torch.allclose(kw.attention(x), (0.75 * expected + 0.25 * kw.beta)[..., :-1], atol=1e-6)


@pytest.mark.parametrize("budget", [1, 2])
def test_tau_one_kernel_is_the_layers_own_cells_in_order(budget):
    torch.manual_seed(0)
    wh = Warehouse(RESNET18_STAGE0, budget)
    kws = [KWConv(wh, i, owner=i == 0).eval() for i in range(len(RESNET18_STAGE0))]
    x = torch.randn(3, 64, 6, 6)
    for kw, (out, in_g, *k) in zip(kws, RESNET18_STAGE0, strict=True):
        cells = wh.cells[[c for c in wh.layout.assigned[kw.index]]].detach()
        if budget == 1:
            assert torch.equal(cells, wh.cells[kw.local[0]:kw.local[0] + kw.m].detach())
        with torch.no_grad():
            w = kw.kernels(x)
        assert w.shape == (3, out, in_g, *k)
        for b in range(3):
            assert torch.equal(w[b], assemble(cells, out, in_g, tuple(k)))


@pytest.mark.parametrize("conv", [
    {},
    {"stride": 2, "bias": True},
    {"kernel_size": (3, 5), "padding": (1, 2), "dilation": (2, 1), "padding_mode": "reflect"},
    {"in_channels": 32, "groups": 32, "padding": "same"},  # depthwise
    {"groups": 4, "kernel_size": 1, "padding": 0},
])
def test_kw_at_tau_one_budget_one_is_the_static_conv(conv):
    static, kw = kw_pair(**conv)
    x = torch.randn(3, static.in_channels, 11, 10)
    kw.eval()
    with torch.no_grad():
        assert rel(static(x), kw(x)) <= TOL


@pytest.mark.parametrize("conv", [{"stride": 2},
                                  {"in_channels": 32, "groups": 32, "dilation": 2, "padding": 2}])
def test_batch_folded_conv_is_one_conv_per_sample(conv):
    _, kw = kw_pair(0.5, **conv)
    kw.train()
    kw.tau.fill_(0.3)
    x = torch.randn(4, kw.in_channels, 9, 9)
    with torch.no_grad():
        y, w = kw(x), kw.kernels(x)
        ref = torch.cat([F.conv2d(x[b:b + 1], w[b], kw.bias, kw.stride, kw.padding, kw.dilation, kw.groups)
                         for b in range(4)])
    assert rel(ref, y) <= TOL


@pytest.mark.parametrize("conv", [
    {"kernel_size": 1, "padding": 0, "bias": True},  # one bmm
    {"kernel_size": 1, "padding": 0, "stride": 2},  # subsampled, one bmm
    {"stride": 2},  # dense: one conv per sample (large convs) or batch-folded (small ones)
    {"groups": 4},  # grouped: the same
    {"in_channels": 32, "groups": 32},  # depthwise: batch folded into the groups (channels-last: per sample)
])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("per_sample_macs", [0, None])  # 0: every conv counts as large; None: the default
def test_fast_paths_equal_the_batch_grouped_forward(conv, batch, channels_last, per_sample_macs, monkeypatch):
    if per_sample_macs is not None:
        monkeypatch.setattr(kernel_warehouse, "_PER_SAMPLE_MACS", per_sample_macs)
    _, kw = kw_pair(0.5, **conv)
    kw.eval().tau.fill_(0.3)
    x = torch.randn(batch, kw.in_channels, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y, ref = kw(x), grouped_forward(kw, x)
    assert y.shape == ref.shape and rel(ref, y) <= 1e-6
    if channels_last and batch > 1 and (conv.get("groups") == 32 or kw._matmul_only and "stride" not in conv):
        assert y.is_contiguous(memory_format=torch.channels_last)  # the 1x1 bmm and depthwise convs keep it


@pytest.mark.parametrize("budget", [0.5, 2.0])
def test_channels_last_maps_get_channels_last_kernels_of_the_same_values(budget):
    _, kw = kw_pair(budget, stride=2)
    kw.eval().tau.fill_(0.3)
    x = torch.randn(3, 16, 9, 9)
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for workspace in (False, True):
            w, wc = kw.kernels(x, workspace=workspace).clone(), kw.kernels(xc, workspace=workspace)
            assert all(wc[i].is_contiguous(memory_format=torch.channels_last) for i in range(3))
            assert rel(w, wc) <= 1e-6  # (the attention pools the two layouts in different orders)
        assert rel(kw(x), kw(xc)) <= 1e-6


@pytest.mark.parametrize("conv", [
    {"kernel_size": 1, "padding": 0},  # in cells of one: the product is already the kernel's layout
    {"stride": 2},  # taps and cells permuted: a second buffer
    {"in_channels": 32, "groups": 32},
])
def test_inference_kernels_in_reused_buffers_are_the_same(conv):
    """Without autograd the kernels go to this thread's reused buffers: same values, whatever ran before, in
    no_grad, inference_mode and another thread at the same time."""
    _, kw = kw_pair(0.5, **conv)
    kw.eval().tau.fill_(0.3)
    x = torch.randn(3, kw.in_channels, 9, 9)
    expected = kw(x).detach()
    with torch.no_grad():
        assert torch.equal(kw.kernels(x, workspace=True), kw.kernels(x))
        kw(torch.randn(5, kw.in_channels, 12, 12))  # a larger batch grows the buffers in between
        assert torch.equal(kw(x), expected)
    with torch.inference_mode():
        assert torch.equal(kw(x), expected)
    results = []

    def run() -> None:
        with torch.no_grad():
            results.extend(torch.equal(kw(x), expected) for _ in range(20))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 40


@pytest.mark.parametrize("shape", [(3, 16), (3, 5, 7, 16)])
def test_linear_is_a_dynamic_1x1_conv_over_the_last_dim(shape):
    torch.manual_seed(0)
    linears = [nn.Linear(16, 64), nn.Linear(64, 16)]
    kws = convert_convs(linears, 1)
    x = torch.randn(*shape)
    with torch.no_grad():
        assert rel(linears[1](linears[0](x)), kws[1].eval()(kws[0].eval()(x))) <= TOL  # tau = 1: static
        for kw in kws:
            kw.tau.fill_(0.3)
        h = kws[0](x)
        assert rel(grouped_forward(kws[0], x), h) <= 1e-6
        assert rel(grouped_forward(kws[1], h), kws[1](h)) <= 1e-6


def test_conv1d():
    torch.manual_seed(0)
    convs = [nn.Conv1d(8, 16, 5, padding=2), nn.Conv1d(16, 16, 3, stride=2)]
    kws = convert_convs(convs, 1)
    x = torch.randn(2, 8, 20)
    with torch.no_grad():
        assert rel(convs[1](convs[0](x)), kws[1].eval()(kws[0].eval()(x))) <= TOL


def test_gradients_reach_warehouse_and_attention():
    torch.manual_seed(0)
    convs = [nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)]
    kws = convert_convs(convs, 0.5)
    set_temperature(nn.ModuleList(kws), 0.5)
    x = torch.randn(4, 8, 8, 8)
    kws[1](F.relu(kws[0](x))).square().mean().backward()
    wh = kws[0].warehouse
    assert kws[1]._warehouse[0] is wh and not hasattr(kws[1], "warehouse")
    assert wh.cells.grad is not None and wh.cells.grad.abs().sum() > 0
    for kw in kws:
        for p in (kw.fc1.weight, kw.fc2.weight, kw.fc2.bias, kw.norm.weight):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_nonlocal_basis():
    torch.manual_seed(0)
    convs = [nn.Conv2d(64, 64, 3, padding=1) for _ in range(4)]
    full, basis = convert_convs(convs, 0.5), convert_convs(convs, 0.5, nonlocal_basis=1 / 16)
    count = [sum(p.numel() for p in nn.ModuleList(k).parameters()) for k in (full, basis)]
    assert count[1] < count[0]
    kw = basis[2]
    assert kw.fc2.out_features == kw.m * (kw.local[1] + 16 + 1)  # own cells, a basis of 16, the zero cell
    assert kw.fc3.in_features == 16 and kw.fc3.out_features == kw.n - kw.local[1]
    kw.train().tau.fill_(0.5)
    x = torch.randn(2, 64, 5, 5)
    alpha = kw.attention(x)
    assert alpha.shape == (2, kw.m, kw.n)
    kw(x).sum().backward()
    assert kw.fc3.weight.grad.abs().sum() > 0 and kw.basis_bias.grad.abs().sum() > 0


# --- state, copies, temperature -----------------------------------------------------------------------------
def two_layer(budget=1.0, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*convert_convs([nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3)], budget))


def test_state_dict_round_trip_keeps_tau_and_lists_the_warehouse_once():
    model = two_layer()
    assert set_temperature(model, 0.3) == 2
    state = model.state_dict()
    assert [k for k in state if k.endswith("cells")] == ["0.warehouse.cells"]
    assert float(state["0.tau"]) == pytest.approx(0.3) and float(state["1.tau"]) == pytest.approx(0.3)
    assert sum(p.numel() for p in model.parameters()) == sum(v.numel() for k, v in state.items()
                                                             if "running" not in k and "tau" not in k
                                                             and "num_batches" not in k)
    fresh = two_layer(seed=1)
    assert float(fresh[1].tau) == 1.0
    fresh.load_state_dict(state)
    assert float(fresh[1].tau) == pytest.approx(0.3)
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), fresh.eval()(x))


def test_deepcopy_keeps_tau_and_sharing():
    model = two_layer()
    set_temperature(model, 0.7)
    twin = copy.deepcopy(model)
    assert float(twin[1].tau) == pytest.approx(0.7)
    assert twin[1]._warehouse[0] is twin[0].warehouse is not model[0].warehouse
    with torch.no_grad():
        twin[0].warehouse.cells.zero_()
    assert model[0].warehouse.cells.abs().sum() > 0


def test_temperature_schedule():
    model = two_layer()
    sched = TemperatureSchedule(model, epochs=2, steps_per_epoch=5)
    assert float(model[0].tau) == 1.0
    taus = [sched.step() for _ in range(12)]
    assert taus[:10] == pytest.approx([1 - t / 10 for t in range(1, 11)])
    assert taus[10:] == [0.0, 0.0] and float(model[1].tau) == 0.0
    resumed = TemperatureSchedule(model, epochs=2, steps_per_epoch=5)
    resumed.load_state_dict({"steps": 3, "tau": 0.7})
    assert resumed.step() == pytest.approx(0.6) and float(model[0].tau) == pytest.approx(0.6)
    assert lkfx.set_temperature(model, 0.25) == 2 and float(model[0].tau) == 0.25
    with pytest.raises(LkfxError, match="no KernelWarehouse convs"):
        lkfx.set_temperature(nn.Conv2d(1, 1, 1), 0.5)


# --- ONNX export with a dynamic batch -----------------------------------------------------------------------
@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_export_dynamic_batch(tmp_path, dynamo):
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
             nn.Conv2d(16, 8, 1, bias=True)]
    model = nn.Sequential(*convert_convs(convs, 0.5)).eval()
    set_temperature(model, 0.4)
    path = tmp_path / "kw.onnx"
    x = torch.randn(2, 3, 12, 12)
    if dynamo:
        torch.onnx.export(model, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {0: "batch"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        xb = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            ref = model(xb).numpy()
        (got,) = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})
        assert got.shape == ref.shape
        assert max_rel_error([ref], [got]) <= TOL


# --- DistributedDataParallel (gloo, 2 CPU processes) --------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        net = ddp_net()
        model = lkfx.transform(net, [("kernel_warehouse", {"budget": 0.5})],
                               example_inputs=torch.randn(2, 3, 8, 8))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        sched = TemperatureSchedule(model, epochs=1, steps_per_epoch=4)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for _ in range(4):
            sched.step()
            x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.randint(0, 4, (6,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save({"state": model.state_dict(), "params": dict(model.named_parameters())}, out.format(rank))
    finally:
        dist.destroy_process_group()


def test_distributed_data_parallel_two_processes(tmp_path):
    import torch.multiprocessing as mp

    pattern = str(tmp_path / "rank{}.pt")
    mp.start_processes(_ddp_worker, args=(2, free_port(), pattern), nprocs=2, start_method="spawn")
    p0, p1 = (torch.load(pattern.format(r), weights_only=False) for r in range(2))
    assert p0["params"].keys() == p1["params"].keys()
    assert any(k.endswith("warehouse.cells") for k in p0["params"])
    for k, v in p0["params"].items():
        assert torch.equal(v, p1["params"][k]), k
    taus = {k: float(v) for k, v in p0["state"].items() if k.endswith(".tau")}
    assert len(taus) == 2 and set(taus.values()) == {0.0}
