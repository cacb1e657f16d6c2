"""Property-based tests (hypothesis): random conv networks through every exact pass chain on both frontends give
the original's outputs within the pass's tolerance, or the pass refuses with a reason (tests/fuzz/props.py).

CI runs few examples, derandomized (the same networks every run); scripts/fuzz_campaign.py runs thousands.
A failure shrinks to a minimal network, which hypothesis prints as a program (`note(str(net))`).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from .netgen import HypothesisDraw, RandomDraw, draw_net
from .props import FX_CHAINS, ONNX_CHAINS, check_fx, check_onnx

CI = settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(FX_CHAINS))
@CI
@given(data=st.data())
def test_fx_pass_exact_or_refused(name, data):
    net = draw_net(HypothesisDraw(data))
    note(str(net))
    check_fx(net, FX_CHAINS[name])


@pytest.mark.parametrize("name", sorted(ONNX_CHAINS))
@CI
@given(data=st.data())
def test_onnx_pass_exact_or_refused(name, data):
    net = draw_net(HypothesisDraw(data))
    note(str(net))
    check_onnx(net, ONNX_CHAINS[name])


def test_generator_covers_the_structures_it_promises():
    """Over 200 seeds the networks contain every structure the issue lists, so the properties above see them."""
    seen = Counter()
    for seed in range(200):
        net = draw_net(RandomDraw(seed))
        modules = Counter(op.module for op in net.ops if op.kind == "conv")
        readers = Counter(s for op in net.ops for s in op.srcs)
        producer = {t: op for t, op in enumerate(net.ops, 1)}
        for op in net.ops:
            if op.kind == "conv":
                _, kernel, stride, dilation, groups, pads, mode, _ = op.attrs
                seen.update({f"kernel {max(kernel)}", f"stride {stride}", f"dilation {dilation}", f"pad mode {mode}",
                             "grouped" if 1 < groups < net.shapes[op.srcs[0]][0] else "",
                             "depthwise" if groups == net.shapes[op.srcs[0]][0] > 1 else "",
                             "asymmetric kernel" if kernel[0] != kernel[1] else "",
                             "padding" if any(pads) else "no padding"})
                src = producer.get(op.srcs[0])
                if src is not None and src.kind == "bn":
                    seen["bn before conv" + (" with padding" if any(pads) and mode == "zeros" else "")] += 1
            if op.kind == "bn" and op.srcs[0] in producer and producer[op.srcs[0]].kind in ("conv", "deconv"):
                seen[f"bn after {producer[op.srcs[0]].kind}"] += 1
            if op.kind == "deconv" and op.attrs[5] > 1:
                seen["grouped deconv"] += 1
            if op.kind == "bn" and op.attrs[1]:
                seen["bn in training mode"] += 1
            if op.kind in ("add", "sub") and all(s in producer and producer[s].kind in ("conv", "bn")
                                                 for s in op.srcs):
                seen["branches summed"] += 1
        seen["shared weights"] += any(n > 1 for n in modules.values())
        attrs = {}
        for op in net.ops:
            if op.kind == "conv":
                seen["shared weights, other attributes"] += attrs.setdefault(op.module, op.attrs) != op.attrs
                seen["functional conv"] += op.functional
        seen["multi-consumer tensor"] += any(n > 1 for n in readers.values())
        seen["extra output"] += bool(net.extra_outputs)
        seen[f"opset {net.opset}"] += 1
    expected = ["kernel 1", "kernel 3", "kernel 13", "stride 2", "stride 3", "dilation 2", "dilation 3", "grouped",
                "depthwise", "asymmetric kernel", "no padding", "pad mode reflect", "pad mode replicate",
                "pad mode circular", "bn before conv", "bn before conv with padding", "bn after conv",
                "bn after deconv", "grouped deconv",
                "bn in training mode", "branches summed", "shared weights", "shared weights, other attributes",
                "functional conv", "multi-consumer tensor", "extra output",
                "opset 13", "opset 17", "opset 20"]
    assert not [e for e in expected if seen[e] == 0], seen


def test_campaign_script_quick(tmp_path, capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    try:
        import fuzz_campaign
    finally:
        sys.path.pop(0)
    out = tmp_path / "campaign.json"
    assert fuzz_campaign.main(["--count", "3", "--out", str(out)]) == 0
    assert "3 networks x 10 chains" in capsys.readouterr().out
    assert out.exists()
