"""torch.compile(model, backend="lkfx"): eager vs compiled within 1e-5 (max-normalised) for a ResNet-like, a
ConvNeXt-like and a 31x31-depthwise network, in eval / no_grad (BN folded with the real values, FFT convs) and in
training (loss, every gradient and the BN running statistics); recompiles when a folded weight changes; graph
breaks; dynamic shapes; the entry point in a fresh process that never imports lkfx. Inductor compiles C++ here,
so the networks are tiny."""

from __future__ import annotations

import logging
import subprocess
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import randomize_bn

from lkfx.backends.dynamo import last_report
from lkfx.compare import max_rel_error

TOL = 1e-5
FFT_ALWAYS = ("fft_conv", {"min_kernel": 5, "mode": "always"})


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    def __init__(self, graph_break: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer = Block(8, 16, 2)
        self.fc = nn.Linear(16, 10)
        self.graph_break = graph_break

    def forward(self, x):
        x = self.stem(x)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.fc(self.layer(x).mean((2, 3)))


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        return x + self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), nn.BatchNorm2d(16))
        self.blocks = ConvNeXtBlock(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class LargeKernel(nn.Module):
    """RepLKNet-style: 1x1 conv-BN-ReLU, 31x31 depthwise conv-BN, 1x1 conv, residual."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.pw1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.dw = nn.Conv2d(c, c, 31, padding=15, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw2 = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw2(self.bn(self.dw(self.pw1(x))))


# model, input shape, passes (None: the defaults, fold_bn only on the CPU), BatchNorms folded in inference, FFT convs
CASES = {
    "resnet": (ResNetLike, (2, 3, 16, 16), None, 4, 0),
    "convnext": (ConvNeXtLike, (2, 3, 32, 32), ["fold_bn", FFT_ALWAYS], 1, 1),
    "large_kernel": (LargeKernel, (2, 8, 16, 16), ["fold_bn", FFT_ALWAYS], 2, 1),
}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(name: str):
    cls, shape, passes, folds, ffts = CASES[name]
    torch.manual_seed(0)
    model = randomize_bn(cls())
    options = {} if passes is None else {"passes": passes}
    return model, torch.randn(shape), options, folds, ffts


def err(ref, out) -> float:
    return max_rel_error([ref.detach().numpy()], [out.detach().numpy()])


@pytest.mark.parametrize("name", list(CASES))
def test_inference_equals_eager(name):
    model, x, options, folds, ffts = make(name)
    model.eval()
    compiled = torch.compile(model, backend="lkfx", options=options)
    with torch.no_grad():
        ref, out = model(x), compiled(x)
    assert err(ref, out) <= TOL
    report = last_report()
    assert report["fold_bn"].rewritten == folds
    assert [p.name for p in report.passes] == ["fold_bn", "fft_conv"]
    if ffts:
        assert report["fft_conv"].rewritten == ffts
    assert report.after["batch_norms"] == 0


def test_cpu_default_prices_the_candidates():
    """CPU defaults: fold_bn and fft_conv auto, whose report names for each large conv the chosen candidate and
    every candidate's predicted time, direct convs priced channels-last without conversion (inductor's layout)."""
    model, x, _, _, _ = make("large_kernel")
    model.eval()
    with torch.no_grad():
        ref, out = model(x), torch.compile(model, backend="lkfx")(x)
    assert err(ref, out) <= TOL
    pr = last_report()["fft_conv"]
    lines = pr.notes + [s.reason for s in pr.skipped if "below min_kernel" not in s.reason]
    assert lines and all(", channels-last -> " in t and "predicted NCHW direct" in t and "channels-last direct" in t
                         and "FFT" in t for t in lines), lines


@pytest.mark.parametrize("name", list(CASES))
def test_training_equals_eager(name):
    model, x, options, _, ffts = make(name)
    model.train()
    twin = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model, backend="lkfx", options=options)
    loss = compiled(x).square().mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    stats = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(twin)
    model.zero_grad()
    ref_loss = model(x).square().mean()
    ref_loss.backward()
    assert err(ref_loss, loss) <= TOL
    # All gradients as one vector: a conv bias before a training-mode BN has a gradient that is zero up to
    # rounding, which no per-tensor relative measure can compare.
    assert err(torch.cat([p.grad.flatten() for p in model.parameters()]), grads) <= TOL
    for k, v in model.state_dict().items():
        assert err(v, stats[k]) <= TOL, f"{k} after one training step"
    report = last_report()
    if ffts:
        assert report["fft_conv"].rewritten == ffts
    assert report["fold_bn"].rewritten == 0 and "not applied in training" in report["fold_bn"].notes[0]


def test_weight_change_recompiles(caplog):
    model, x, options, _, _ = make("large_kernel")
    model.eval()
    compiled = torch.compile(model, backend="lkfx", options=options)
    with torch.no_grad():
        compiled(x)
        model.bn.weight.mul_(3)  # folded into the 31x31 conv's constants
        model.dw.weight.add_(0.5)
        with caplog.at_level(logging.INFO, logger="lkfx.backends.dynamo"):
            out = compiled(x)
        assert err(model(x), out) <= TOL
    assert any("recompiling" in r.message for r in caplog.records)


def test_graph_break(caplog):
    torch.manual_seed(0)
    model = randomize_bn(ResNetLike(graph_break=True)).eval()
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.INFO, logger="lkfx.backends.dynamo"), torch.no_grad():
        out = torch.compile(model, backend="lkfx", options={"passes": ["fold_bn"]})(x)
        assert err(model(x), out) <= TOL
    graphs = [r for r in caplog.records if "inference graph" in r.message]
    assert len(graphs) == 2, "one report per graph Dynamo hands over"


def test_dynamic_shapes_compile_without_passes():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="lkfx", dynamic=True)
    with torch.no_grad():
        assert err(model(x), compiled(x)) <= TOL
    assert "dynamic shapes" in last_report().notes[0]


def test_bad_options():
    model, x, _, _, _ = make("resnet")
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(model, backend="lkfx", options={"no_such_option": 1})(x)
    with pytest.raises(Exception, match="unknown pass 'nope'"):
        torch.compile(model, backend="lkfx", options={"passes": ["nope"]})(x)


def test_fresh_process_without_import(python, tmp_path):
    script = textwrap.dedent("""
        import sys
        import torch
        import torch.nn as nn

        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
        x = torch.randn(1, 3, 8, 8)
        assert "lkfx" not in sys.modules
        with torch.no_grad():
            out = torch.compile(model, backend="lkfx")(x)
            err = ((out - model(x)).abs().max() / model(x).abs().max()).item()
        from lkfx.backends.dynamo import last_report
        print(err, last_report()["fold_bn"].rewritten)
    """)
    run = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    err_, folded = run.stdout.split()
    assert float(err_) <= TOL and folded == "1"
