"""The property every exact pass must satisfy on every network of `netgen`, on both frontends:

- the result computes what the original did, within the passes' tolerance (fp32 max relative error), or the pass
  refused: a skip with a non-empty reason in the report (or, for the whole call, an `LkfxError`). A network so
  ill-conditioned that fp32 rounding alone moves its output by more than the tolerance (e.g. a training-mode BN
  normalising two values per channel) gets `SENSITIVITY` x that rounding error (the original in fp32 vs in fp64)
  as its tolerance, and is counted (`Outcome.widened`): an exact rewrite only changes rounding;
- no other exception; the caller's model is untouched;
- `fold_bn`: each rewrite removes one BatchNorm. What a second run still folds is recorded (`Outcome.refolded`),
  not asserted: fold_bn folds one BatchNorm of a chain conv -> BN -> BN per run (the rule sees the second BN's
  producer only once the first is gone).

`check_fx` / `check_onnx` raise AssertionError on a violation and otherwise return an `Outcome` (for the
campaign's counts).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lkfx.compare import max_rel_error
from lkfx.errors import LkfxError

from .netgen import Net, example_input, to_module, to_onnx

SENSITIVITY = 4
RLK = ("reparam_large_kernel", {"kernel_size": 7, "min_kernel": 3})
FFT = ("fft_conv", {"mode": "always", "min_kernel": 1})
FX_CHAINS: dict[str, list] = {
    "fold_bn": ["fold_bn"],
    "fold_bn(before=false)": [("fold_bn", {"before": False})],
    "merge_reparam": ["merge_reparam"],
    "merge_reparam+fold_bn": ["merge_reparam", "fold_bn"],
    "reparam_large_kernel+merge_reparam": [RLK, "merge_reparam"],
    "fft_conv": [FFT],
}
ONNX_CHAINS: dict[str, list] = {
    "fold_bn": ["fold_bn"],
    "merge_reparam": ["merge_reparam"],
    "fold_bn+merge_reparam": ["fold_bn", "merge_reparam"],
    "fft_conv": [FFT],
}


@dataclass
class Outcome:
    rewritten: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # LkfxError messages for the whole call
    reasons: list[str] = field(default_factory=list)  # "pass: reason" of every skip
    refolded: int = 0  # BatchNorms a second fold_bn run still folded
    widened: int = 0  # comparisons that needed the ill-conditioning tolerance (not counted in `error`)
    error: float = 0.0


def _tolerance(passes: list) -> float:
    from lkfx.passes import resolve_passes

    return max(p.tolerance for p in resolve_passes(passes))


def rounding_error(net: Net, train_bn: bool = True) -> float:
    """How far fp32 rounding alone moves the network's output: the original in fp32 vs the same in fp64."""
    import torch

    model = to_module(net, train_bn)
    x = torch.from_numpy(example_input(net))
    return max_rel_error(_fx_outputs(model.double(), x.double()), _fx_outputs(model.float(), x))


def _assert_close(outcome: Outcome, err: float, tol: float, net: Net, train_bn: bool, what: str) -> None:
    if err > tol:
        rounding = rounding_error(net, train_bn)
        assert err <= SENSITIVITY * rounding, \
            f"{what}: max relative error {err:.3g} > tolerance {tol:g} (fp32 rounding alone: {rounding:.3g})"
        outcome.widened += 1
        return
    outcome.error = max(outcome.error, err)


def _record(outcome: Outcome, report: Any) -> None:
    for pr in report.passes:
        for s in pr.skipped:
            assert isinstance(s.reason, str) and s.reason.strip(), f"{pr.name}: skip of {s.where} without a reason"
        assert pr.rewritten >= 0 and (pr.rewritten > 0) == pr.modified
        outcome.rewritten[pr.name] = outcome.rewritten.get(pr.name, 0) + pr.rewritten
        outcome.skipped[pr.name] = outcome.skipped.get(pr.name, 0) + len(pr.skipped)
        outcome.reasons += [f"{pr.name}: {s.reason}" for s in pr.skipped]


# --- torch.fx -----------------------------------------------------------------------------------------------
def _fx_outputs(model: Any, x: Any) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [o.numpy() for o in model(x)]


def _fx_bn_count(model: Any) -> int:
    import torch

    gm = torch.fx.symbolic_trace(model) if not isinstance(model, torch.fx.GraphModule) else model
    mods = dict(gm.named_modules())
    return sum(n.op == "call_module" and isinstance(mods[n.target], torch.nn.BatchNorm2d) for n in gm.graph.nodes)


def check_fx(net: Net, chain: list) -> Outcome:
    import torch

    import lkfx

    model = to_module(net)
    x = torch.from_numpy(example_input(net))
    ref = _fx_outputs(model, x)
    state = copy.deepcopy(model.state_dict())
    outcome = Outcome()
    current = model
    for step in chain:  # compare after every step of a chain: each pass is exact on its own
        previous = current
        try:
            current, report = lkfx.transform(current, [step], example_inputs=x, return_report=True)
        except LkfxError as e:
            outcome.refused.append(f"{step}: {e}")
            break
        _record(outcome, report)
        err = max_rel_error(ref, _fx_outputs(current, x))
        _assert_close(outcome, err, _tolerance([step]), net, True, f"FX {step} after {chain}\n{report}\n")
        if step == "fold_bn":
            bns = _fx_bn_count(current)
            assert bns == _fx_bn_count(previous) - report["fold_bn"].rewritten, "fold_bn count of BatchNorms"
            again = lkfx.transform(current, ["fold_bn"], example_inputs=x, return_report=True)[1]["fold_bn"]
            outcome.refolded += again.rewritten
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state), "transform modified the caller's module"
    return outcome


# --- ONNX ---------------------------------------------------------------------------------------------------
def check_onnx(net: Net, chain: list) -> Outcome:
    import lkfx
    from lkfx.graph import onnx as gonnx

    model = to_onnx(net)
    before = model.SerializeToString()
    feeds = {"t0": example_input(net)}
    ref = gonnx.run(model, feeds)
    outcome = Outcome()
    try:
        out, report = lkfx.transform(model, chain, return_report=True)
    except LkfxError as e:
        outcome.refused.append(str(e))
        return outcome
    assert model.SerializeToString() == before, "transform modified the caller's ModelProto"
    _record(outcome, report)
    err = max_rel_error(ref, gonnx.run(out, feeds))
    _assert_close(outcome, err, _tolerance(chain), net, False, f"ONNX {chain}\n{report}\n")
    if chain == ["fold_bn"]:
        count = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
        assert count == sum(n.op_type == "BatchNormalization" for n in model.graph.node) - report["fold_bn"].rewritten
        outcome.refolded += lkfx.transform(out, ["fold_bn"], return_report=True)[1]["fold_bn"].rewritten
    return outcome
