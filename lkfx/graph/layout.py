"""Channels-last regions of a torch.fx graph: convert a tensor's layout once at a region's edges, not per conv.

Eager PyTorch keeps a tensor's memory format through convs, BatchNorm, activations, pooling and elementwise ops:
give the first op of a run of such ops a channels-last (NHWC) tensor and every op after it produces channels-last
tensors too. So a run of these *layout-agnostic* ops around large depthwise convs runs channels-last with one
conversion per tensor entering the run (``x.contiguous(memory_format=torch.channels_last)``) and one per tensor
leaving it (``y.contiguous()``), however many convs it holds; a per-conv conversion would pay two copies per conv.
Converting never changes a value, only strides, so any region is exact; which regions pay is the caller's call.

`region_of` grows a region from a node through neighbours that are layout-agnostic 4-D ops (it needs shapes:
``tensor_meta`` from `lkfx.graph.fx.propagate_shapes`); `edges` lists the tensors entering and leaving it;
`convert` inserts the conversions. `memory_format_of` tells a tensor's layout at run time.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

AGNOSTIC_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
                    nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.Mish, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d)
AGNOSTIC_FUNCTIONS = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub,
                      torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.gelu, F.silu, F.hardswish,
                      F.conv2d, torch.conv2d}
AGNOSTIC_METHODS = {"add", "mul", "sub", "relu", "sigmoid", "tanh"}


def _is_4d(node: fx.Node) -> bool:
    meta = node.meta.get("tensor_meta")
    return meta is not None and hasattr(meta, "shape") and len(meta.shape) == 4


def agnostic(gm: fx.GraphModule, node: fx.Node, extra_modules: tuple[type, ...] = ()) -> bool:
    """Whether `node` is an op that keeps a channels-last input's layout and computes the same values."""
    if not _is_4d(node):
        return False
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (*AGNOSTIC_MODULES, *extra_modules))
    if node.op == "call_function":
        return node.target in AGNOSTIC_FUNCTIONS
    return node.op == "call_method" and node.target in AGNOSTIC_METHODS


def data_inputs(gm: fx.GraphModule, node: fx.Node) -> list[fx.Node]:
    """The 4-D activation inputs of `node` (a functional conv's weight and bias are not activations)."""
    if node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
        inputs = [node.args[0] if node.args else node.kwargs["input"]]
    else:
        inputs = node.all_input_nodes
    return [a for a in inputs if isinstance(a, fx.Node) and _is_4d(a)]


def region_of(gm: fx.GraphModule, start: fx.Node, extra_modules: tuple[type, ...] = ()) -> set[fx.Node]:
    """The connected layout-agnostic nodes around `start` (through activation edges, both ways)."""
    region, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for other in (*data_inputs(gm, node), *node.users):
            if other not in region and agnostic(gm, other, extra_modules) and \
                    (other in node.users and node in data_inputs(gm, other) or other in data_inputs(gm, node)):
                region.add(other)
                todo.append(other)
    return region


def edges(gm: fx.GraphModule, region: set[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(tensors entering the region, region tensors used outside it), each once, in graph order."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    entering = {a for n in region for a in data_inputs(gm, n) if a not in region}
    leaving = {n for n in region if any(u not in region or n not in data_inputs(gm, u) for u in n.users)}
    return sorted(entering, key=order.get), sorted(leaving, key=order.get)


def is_channels_last(node: fx.Node) -> bool:
    """Whether the example run gave `node` a channels-last tensor (then it needs no conversion at an edge)."""
    return node.meta["tensor_meta"].memory_format == torch.channels_last


def nbytes(node: fx.Node) -> int:
    meta = node.meta["tensor_meta"]
    return meta.shape.numel() * meta.dtype.itemsize


def convert(gm: fx.GraphModule, region: set[fx.Node], channels_last: bool = True) -> None:
    """Run `region` channels-last (or NCHW): convert each tensor entering it that has the other layout before its
    first use there, and each region tensor used outside it back to the layout it had in the example run, for those
    uses (the model's outputs keep the layout the model gave them)."""
    entering, leaving = edges(gm, region)
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for a in entering:
        if is_channels_last(a) == channels_last:
            continue
        users = [u for u in a.users if u in region]
        with graph.inserting_before(min(users, key=order.get)):
            new = graph.call_method("contiguous", (a,), {"memory_format": _format(channels_last)})
        new.meta.update(a.meta)
        for u in users:
            u.replace_input_with(a, new)
    for n in leaving:
        if is_channels_last(n) == channels_last:
            continue
        outside = [u for u in n.users if u not in region or n not in data_inputs(gm, u)]
        with graph.inserting_after(n):
            back = graph.call_method("contiguous", (n,), {"memory_format": _format(is_channels_last(n))})
        back.meta.update(n.meta)
        for u in outside:
            u.replace_input_with(n, back)


def _format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4-D tensor laid out channels-last and not also contiguous (1x1 maps and single
    channels are both), else ``torch.contiguous_format``."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return _format(channels_last)
