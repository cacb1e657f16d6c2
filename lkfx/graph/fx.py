"""Tracing nn.Modules to torch.fx, and running them for checks.

`trace` names the module where symbolic tracing failed and suggests ``leaf_modules=``; `submodule_inputs`
records what each submodule received on example inputs, for the per-submodule fallback used when the whole
model cannot be traced. Conv-like modules (`conv_like`) are kept whole, as leaves.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from lkfx.errors import LkfxError


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or conv_like(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        if type(m) is nn.Identity:  # no node: what it is placed between (timm's BatchNormAct2d) stays adjacent
            return args[0]
        # Popped only on success: when tracing fails, the stack still ends with the module that failed.
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


class TraceError(LkfxError):
    """`detail` says where tracing failed and why: ``in <module>: <error>``."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_conv_like: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def conv_like(m: nn.Module) -> bool:
    """True for a subclass of nn.Conv1d/2d/3d with its own ``forward`` that returns the convolution of its own
    ``weight`` and ``bias`` parameters, unchanged; what it does to its input first does not matter (timm's
    Conv2dSame pads it by an amount computed from its size, which torch.fx cannot trace). Its output is then
    ``conv(g(x), W, b)``, linear in (W, b) per output channel, so a BatchNorm after it folds into W and b exactly.

    Decided from the forward's ATen graph (`make_fx`, weight and bias passed in as inputs) on a small zero input,
    once per module: timm's StdConv2d, which standardises its weight first, is not conv-like.
    """
    base = next((b for b in type(m).__mro__ if b in _CONVS), None)
    if base is None or type(m).forward is base.forward:
        return False
    if m not in _conv_like:
        _conv_like[m] = _probe_conv_like(m)
    return _conv_like[m]


def _probe_conv_like(m: nn.Module) -> bool:
    from torch.fx.experimental.proxy_tensor import make_fx

    names = ["weight"] + (["bias"] if isinstance(m.bias, torch.Tensor) else [])
    size = [(k - 1) * d + s + 2 for k, d, s in zip(m.kernel_size, m.dilation, m.stride, strict=True)]
    x = torch.zeros(1, m.in_channels, *size, dtype=m.weight.dtype, device=m.weight.device)

    def forward(x, *params):
        return torch.func.functional_call(m, dict(zip(names, params, strict=True)), (x,))

    try:
        with torch.no_grad(), buffers_restored(m):
            g = make_fx(forward)(x, *(getattr(m, n) for n in names)).graph
    except Exception:  # a forward that cannot run on this input is not one we can reason about
        return False
    nodes = list(g.nodes)
    params = [n for n in nodes if n.op == "placeholder"][1:]
    out = nodes[-1].args[0]
    if not (isinstance(out, fx.Node) and out.target is torch.ops.aten.convolution.default):
        return False
    bias = params[1] if len(params) > 1 else None
    return out.args[1] is params[0] and out.args[2] is bias and all(len(p.users) == 1 for p in params) \
        and not out.args[6]  # not transposed


def trace(model: nn.Module, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Symbolically trace `model`; on failure raise `TraceError` naming the module that broke tracing."""
    if isinstance(model, fx.GraphModule):
        return model
    for m in model.modules():  # probed before tracing: symbolic tracing patches the calls the probe makes
        conv_like(m)
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # symbolic tracing raises many kinds of errors
        where = tracer.stack[-1] if tracer.stack else "the top-level forward"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        detail = f"in {where or 'the top-level forward'}: {msg}"
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} ({detail}); "
            "make that module a leaf with leaf_modules=[...] or pass a traceable model", detail
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Record `tensor_meta` (shape, dtype) on every node by running the example inputs.

    Buffers are restored afterwards: a training-mode BatchNorm would otherwise update its running statistics.
    """
    from torch.fx.passes.shape_prop import ShapeProp

    with buffers_restored(gm):
        ShapeProp(gm).propagate(*example_inputs)


@contextlib.contextmanager
def buffers_restored(model: nn.Module):
    """Run `model` without gradients and put every buffer back afterwards (BN running statistics, counters)."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def submodule_inputs(model: nn.Module, example_inputs: tuple) -> dict[str, tuple]:
    """Positional inputs each submodule received in one forward pass (first call only); buffers are restored."""
    seen: dict[str, tuple] = {}
    hooks = []
    for name, m in model.named_modules():
        if name:
            hooks.append(m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, args)))
    try:
        with buffers_restored(model):
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def stats(model: nn.Module) -> dict[str, Any]:
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return {"parameters": sum(p.numel() for p in model.parameters()), "batchnorm_modules": bn}


def flat_outputs(value: Any) -> list:
    """Tensors of a (nested) model output as numpy arrays, in a fixed order."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return [(value.float() if value.dtype == torch.bfloat16 else value).numpy()]
    if isinstance(value, dict):
        return [a for k in sorted(value, key=str) for a in flat_outputs(value[k])]
    if isinstance(value, (list, tuple)):
        return [a for v in value for a in flat_outputs(v)]
    return []
