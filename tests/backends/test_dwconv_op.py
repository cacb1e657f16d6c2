"""``torch.ops.lkfx.dwconv2d`` on the CPU: values and gradients equal F.conv2d (direct and FFT paths), the op's
registrations (opcheck: schema, fake, autograd), torch.compile and torch.export tracing, and ONNX export to the
plugin node, run in onnxruntime through lkfx.backends.ort_ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkfx.backends import dwconv_op, ort_ops
from lkfx.backends.dwconv_plugin import PLUGIN_DOMAIN, PLUGIN_NAME
from lkfx.compare import max_rel_error

TOL = 1e-5


def _reference(x, w, b, stride, pads):
    pt, pl, pb, pr = pads
    return F.conv2d(F.pad(x, (pl, pr, pt, pb)), w, b, stride, groups=x.shape[1])


def _rel(a, b) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


@pytest.mark.parametrize("kernel, stride, pads, bias", [
    ((3, 3), (1, 1), (1, 1, 1, 1), True),
    ((4, 4), (1, 1), (1, 1, 2, 2), False),     # even kernel, torch's 'same'
    ((9, 9), (2, 2), (4, 4, 4, 4), True),
    ((5, 3), (2, 1), (0, 2, 3, 0), True),      # asymmetric padding: neither symmetric nor 'same'
])
def test_values_and_gradients_equal_conv2d(kernel, stride, pads, bias):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 10, 11, generator=gen, requires_grad=True)
    w = torch.randn(5, 1, *kernel, generator=gen, requires_grad=True)
    b = torch.randn(5, generator=gen, requires_grad=True) if bias else None
    y = torch.ops.lkfx.dwconv2d(x, w, b, list(stride), list(pads))
    ref = _reference(x, w, b, stride, pads)
    assert y.shape == ref.shape and _rel(y, ref) <= TOL
    g = torch.randn(ref.shape, generator=gen)
    inputs = (x, w, b) if bias else (x, w)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        assert _rel(got, want) <= TOL


def test_large_kernel_on_the_cpu_equals_conv2d():
    """A 27x27 kernel on a 28x28 map: the cost model may pick the FFT; either way the result is the conv's."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(2, 8, 28, 28, generator=gen), torch.randn(8, 1, 27, 27, generator=gen), torch.randn(8)
    y = torch.ops.lkfx.dwconv2d(x, w, b, [1, 1], [13] * 4)
    assert _rel(y, _reference(x, w, b, (1, 1), (13,) * 4)) <= TOL


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 3, 7, 6, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 5, 5, generator=gen, requires_grad=True)
    b = torch.randn(3, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.lkfx.dwconv2d.default, (x, w, b, [2, 2], [2, 2, 2, 2]))
    torch.library.opcheck(torch.ops.lkfx.dwconv2d.default, (x, w, None, [1, 1], [2, 1, 2, 3]))


def test_torch_compile_traces_forward_and_backward():
    def f(x, w):
        return torch.ops.lkfx.dwconv2d(x, w, None, [1, 1], [1, 1, 1, 1]).relu()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    compiled(x, w).sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    f(x, w).sum().backward()
    assert _rel(gx, x.grad) <= TOL and _rel(gw, w.grad) <= TOL


class _Lowered(nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 9, padding=4, groups=4, bias=bias)

    def forward(self, x):
        return torch.ops.lkfx.dwconv2d(x, self.conv.weight, self.conv.bias, [1, 1], [4, 4, 4, 4]) * 2


def test_torch_export():
    ep = torch.export.export(_Lowered(True), (torch.randn(1, 4, 8, 8),))
    assert torch.ops.lkfx.dwconv2d.default in {n.target for n in ep.graph.nodes}


@pytest.mark.parametrize("bias", [True, False])
def test_onnx_export_to_the_plugin_node_runs_in_onnxruntime(bias):
    model = _Lowered(bias).eval()
    x = torch.randn(2, 4, 8, 8)
    prog = torch.onnx.export(model, (x,), dynamo=True, custom_translation_table=dwconv_op.onnx_translation_table(),
                             verbose=False)
    proto = prog.model_proto
    plugin = [n for n in proto.graph.node if n.op_type == PLUGIN_NAME]
    assert len(plugin) == 1 and plugin[0].domain == PLUGIN_DOMAIN and len(plugin[0].input) == 3
    attrs = {a.name for a in plugin[0].attribute}
    assert {"plugin_namespace", "plugin_version", "strides", "pads", "aot"} <= attrs
    with torch.no_grad():
        want = model(x).numpy()
    got = ort_ops.run(proto, {proto.graph.input[0].name: x.numpy()})
    assert max_rel_error([want], got) <= TOL
    assert np.isfinite(got[0]).all()


@pytest.mark.parametrize("x_shape, w_shape, stride, pads", [
    ((1, 4, 8, 8), (4, 2, 3, 3), [1, 1], [1, 1, 1, 1]),   # not one filter per channel
    ((1, 4, 8, 8), (5, 1, 3, 3), [1, 1], [1, 1, 1, 1]),   # channel count differs
    ((4, 8, 8), (4, 1, 3, 3), [1, 1], [1, 1, 1, 1]),      # not 4-D
    ((1, 4, 8, 8), (4, 1, 3, 3), [3, 1], [1, 1, 1, 1]),   # stride 3
    ((1, 4, 8, 8), (4, 1, 3, 3), [1, 1], [1, 1]),         # padding not (top, left, bottom, right)
    ((1, 4, 2, 2), (4, 1, 9, 9), [1, 1], [0, 0, 0, 0]),   # no output
])
def test_bad_arguments_are_refused_before_any_kernel_runs(x_shape, w_shape, stride, pads):
    with pytest.raises(ValueError, match="lkfx::dwconv2d"):
        torch.ops.lkfx.dwconv2d(torch.randn(x_shape), torch.randn(w_shape), None, stride, pads)


def _costs(fast: str) -> dict:
    """Calibration constants under which candidate `fast` is by far the cheapest for a 9x9 kernel or larger."""
    slow, quick = 1e-6, 1e-15
    tables = {"dw_mac_s": slow, "dw_cl_mac_s": slow, "fft_s": slow}
    tables[{"nchw": "dw_mac_s", "channels_last": "dw_cl_mac_s", "fft": "fft_s"}[fast]] = quick
    from lkfx.backends import fft_cost

    keys = {"dw_mac_s": fft_cost.DW_KERNELS, "dw_cl_mac_s": fft_cost.DW_KERNELS, "fft_s": (8, 128)}
    return {"conv_t0_s": 0.0, "fft_t0_s": 0.0, "op_t0_s": 0.0, "byte_s": 0.0, "convert_s": 0.0, "cmul_s": 0.0,
            "cmac_s": 0.0, "dense_mac_s": {3: 1e-9}, **{k: dict.fromkeys(keys[k], v) for k, v in tables.items()}}


@pytest.mark.parametrize("candidate", ["nchw", "channels_last", "fft"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_every_cpu_candidate_computes_the_conv_in_the_input_layout(tmp_path, monkeypatch, candidate,
                                                                    channels_last):
    """With a calibration file that makes each candidate the choice in turn: the same values (fp32 <= 1e-5
    relative), output in the input's layout, gradients through the op equal."""
    import json

    from lkfx.backends import fft_cost

    monkeypatch.setenv("LKFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fft_cost, "_loaded", {})
    (tmp_path / fft_cost.CACHE_FILE).write_text(json.dumps(
        {"format": fft_cost._FORMAT, "machines": {fft_cost.machine_key("cpu"): _costs(candidate)}}))
    shape = fft_cost.ConvShape(2, 6, 6, 6, (14, 12), (11, 9), ((5, 5), (3, 5)), channels_last)
    assert fft_cost.cost_model("cpu").choose(shape).choice == candidate
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 14, 12, generator=gen)
    x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    w, b = torch.randn(6, 1, 11, 9, generator=gen), torch.randn(6, generator=gen)
    pads = (5, 3, 5, 5)
    ref = _reference(x, w, b, (1, 1), pads)
    with torch.no_grad():
        for _ in range(2):  # the second FFT call reads the cached spectrum
            y = torch.ops.lkfx.dwconv2d(x, w, b, [1, 1], list(pads))
            assert _rel(y, ref) <= TOL
            assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    g = torch.randn(ref.shape, generator=gen)
    got = torch.autograd.grad(torch.ops.lkfx.dwconv2d(xg, wg, b, [1, 1], list(pads)), (xg, wg), g)
    want = torch.autograd.grad(_reference(xg, wg, b, (1, 1), pads), (xg, wg), g)
    assert all(_rel(a, e) <= TOL for a, e in zip(got, want, strict=True))
