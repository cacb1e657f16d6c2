"""Tracing nn.Modules to torch.fx, and running them for checks.

`trace` names the module where symbolic tracing failed and suggests ``leaf_modules=``; `submodule_inputs`
records what each submodule received on example inputs, for the per-submodule fallback used when the whole
model cannot be traced.
"""

from __future__ import annotations

import contextlib
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
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        # Popped only on success: when tracing fails, the stack still ends with the module that failed.
        self.stack.append(self.path_of_module(m))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


class TraceError(LkfxError):
    pass


def trace(model: nn.Module, leaf_modules: Iterable[type] = ()) -> fx.GraphModule:
    """Symbolically trace `model`; on failure raise `TraceError` naming the module that broke tracing."""
    if isinstance(model, fx.GraphModule):
        return model
    tracer = _Tracer(tuple(leaf_modules))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # symbolic tracing raises many kinds of errors
        where = tracer.stack[-1] if tracer.stack else "the top-level forward"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__} (in {where or 'the top-level forward'}: {msg}); "
            "make that module a leaf with leaf_modules=[...] or pass a traceable model"
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
