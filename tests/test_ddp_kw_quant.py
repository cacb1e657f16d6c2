"""KernelWarehouse + fake_quant QAT trained under DistributedDataParallel (gloo, 2 CPU processes): parameters stay
identical across ranks, every parameter gets a gradient (before and after freeze_bn), and the moving-average
activation ranges stay in sync although each rank sees its own data."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import ddp_net, free_port

import lkfx
from lkfx.modules.fake_quant import ConvBnFakeQuant, FakeQuant
from lkfx.modules.kernel_warehouse import TemperatureSchedule
from lkfx.quant import freeze_bn

STEPS = 4


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
        net = ddp_net()
        model = lkfx.transform(net, [("kernel_warehouse", {"budget": 0.5}), ("fake_quant", {"qat": True})],
                               example_inputs=torch.randn(2, 3, 8, 8))
        ddp = torch.nn.parallel.DistributedDataParallel(model)  # find_unused_parameters=False: all must be used
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        sched = TemperatureSchedule(model, epochs=1, steps_per_epoch=STEPS)
        gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
        for step in range(STEPS):
            if step == STEPS // 2:
                freeze_bn(model)
            sched.step()
            x, y = torch.randn(6, 3, 8, 8, generator=gen) * (1 + rank), torch.randint(0, 4, (6,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
        ranges = {n: (m.lo.item(), m.hi.item()) for n, m in model.named_modules() if isinstance(m, FakeQuant)}
        fused = sum(isinstance(m, ConvBnFakeQuant) for m in model.modules())
        torch.save({"params": dict(model.named_parameters()), "ranges": ranges, "fused": fused}, out.format(rank))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes importing torch: ~15 s on 2 cores
def test_kernel_warehouse_qat_under_ddp(tmp_path):
    pattern = str(tmp_path / "rank{}.pt")
    mp.start_processes(_worker, args=(2, free_port(), pattern), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(pattern.format(r), weights_only=False) for r in range(2))
    assert any(k.endswith("warehouse.cells") for k in r0["params"]) and r0["fused"] == 1  # the static stem + BN
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert len(r0["ranges"]) >= 2 and r0["ranges"] == r1["ranges"]
