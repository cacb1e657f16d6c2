"""torch.compile(backend="lkfx") on a GPU against eager: a RepLKNet-like network (31x31 and 13x13 depthwise convs
with BN, 1x1 convs, a residual) in eval / no_grad (BN folded, large depthwise convs lowered to the Triton op) and in
training (loss and every gradient), within 1e-5 (max-normalised; fp32, TF32 off on both sides); and under fp16
autocast within 2e-3. The report says which passes rewrote what."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lkfx.backends.dynamo import last_report


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    return float((out.double() - ref.double()).abs().max() / ref.double().abs().max())


class LargeKernelBlock(nn.Module):
    def __init__(self, c: int, k: int):
        super().__init__()
        self.pw1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Conv2d(c, c, k, padding=k // 2, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw2(torch.relu(self.bn(self.dw(self.pw1(x)))))


def network() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        LargeKernelBlock(32, 31), nn.Conv2d(32, 64, 3, 2, 1), LargeKernelBlock(64, 13),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.cuda()


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.reset()
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    torch._dynamo.reset()


def test_inference_equals_eager():
    net = network().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad():
        ref = net(x)
        out = torch.compile(net, backend="lkfx")(x)
    assert rel_err(out, ref) <= 1e-5
    report = last_report().to_dict()
    print(report)
    rewritten = {p["name"]: p["rewritten"] for p in report["passes"]}
    assert rewritten.get("fold_bn", 0) > 0 and rewritten.get("lower_dwconv", 0) > 0, report


def test_inference_fp16_autocast():
    net = network().eval()
    x = torch.randn(4, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        ref = net(x)
        out = torch.compile(net, backend="lkfx")(x)
    assert rel_err(out.float(), ref.float()) <= 2e-3


def test_training_equals_eager():
    net = network().train()
    twin = network().train()
    twin.load_state_dict(net.state_dict())
    x = torch.randn(4, 3, 64, 64, device="cuda")
    target = torch.randint(0, 10, (4,), device="cuda")
    loss_fn = nn.CrossEntropyLoss()
    ref_loss = loss_fn(twin(x), target)
    ref_loss.backward()
    loss = loss_fn(torch.compile(net, backend="lkfx")(x), target)
    loss.backward()
    assert rel_err(loss, ref_loss) <= 1e-5
    grads = torch.cat([p.grad.flatten() for p in net.parameters()])
    ref_grads = torch.cat([p.grad.flatten() for p in twin.parameters()])
    assert rel_err(grads, ref_grads) <= 1e-5
