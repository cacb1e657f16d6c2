"""ONNX side of the pattern layer, over an onnx-graphsurgeon graph.

A node's kind is its ``op_type`` (``domain::op_type`` outside the default domain). Constant inputs are read
through ``Constant`` and ``Identity`` nodes (the TorchScript exporter routes parameters through ``Identity``),
so a rule sees the numbers whichever way the exporter stored them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx_graphsurgeon as gs
from onnx import numpy_helper


def auto_pad(conv: gs.Node) -> str:
    """A Conv's ``auto_pad`` as text (``NOTSET`` when absent)."""
    value = conv.attrs.get("auto_pad", "NOTSET")
    return value.decode() if isinstance(value, bytes) else value


def onnx_pads(conv: gs.Node, kernel: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(begin, end) zero padding per spatial axis of a Conv whose kernel is `kernel`, from ``pads`` or ``auto_pad``.

    ``SAME_UPPER`` / ``SAME_LOWER`` pad ``dilation * (k - 1)`` in all, the odd one at the end / the beginning:
    that is their padding at stride 1 only (at a larger stride it depends on the input size: refuse that first).
    """
    mode = auto_pad(conv)
    if mode == "VALID":
        return tuple((0, 0) for _ in kernel)
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        dilations = [int(d) for d in conv.attrs.get("dilations", [1] * len(kernel))]
        totals = [d * (int(k) - 1) for k, d in zip(kernel, dilations, strict=True)]
        if mode == "SAME_UPPER":
            return tuple((t // 2, t - t // 2) for t in totals)
        return tuple((t - t // 2, t // 2) for t in totals)
    n = len(kernel)
    pads = [int(p) for p in conv.attrs.get("pads", [0] * 2 * n)]
    return tuple((pads[i], pads[i + n]) for i in range(n))


class OnnxView:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self._overridable = getattr(graph, "lkfx_overridable", frozenset())
        self._index: dict[str, list[gs.Node]] = defaultdict(list)
        for node in graph.nodes:
            self._index[self.kind(node)].append(node)
        self._removed: set[int] = set()
        self._orphaned_producers = False  # a rewrite left a node whose output nobody reads any more
        self._names = set(graph.tensors()) | {n.name for n in graph.nodes}

    # --- GraphView protocol -------------------------------------------------------------------------
    def candidates(self, kinds: frozenset[str]) -> list[gs.Node]:
        if len(kinds) == 1:
            return list(self._index.get(next(iter(kinds)), []))
        return [n for n in self.graph.nodes if self.kind(n) in kinds]

    def kind(self, node: gs.Node) -> str:
        return node.op if node.domain in (None, "", "ai.onnx") else f"{node.domain}::{node.op}"

    def input_node(self, node: gs.Node, index: int) -> gs.Node | None:
        if index >= len(node.inputs) or not node.inputs[index].inputs:
            return None
        return node.inputs[index].inputs[0]

    def alive(self, node: gs.Node) -> bool:
        return id(node) not in self._removed

    def describe(self, node: gs.Node) -> str:
        return node.name or (node.outputs[0].name if node.outputs else node.op)

    # --- reading ------------------------------------------------------------------------------------
    def const(self, tensor: gs.Tensor | None) -> np.ndarray | None:
        """The value of a constant tensor (through Constant / Identity nodes), else None."""
        while tensor is not None:
            if tensor.name in self._overridable:
                return None
            if isinstance(tensor, gs.Constant):
                return np.asarray(tensor.values)
            if len(tensor.inputs) != 1:
                return None
            producer = tensor.inputs[0]
            if producer.op == "Identity" and producer.domain in (None, "", "ai.onnx"):
                tensor = producer.inputs[0]
            elif producer.op == "Constant" and "value" in producer.attrs:
                value = producer.attrs["value"]
                return np.asarray(value.values if isinstance(value, gs.Constant) else numpy_helper.to_array(value))
            else:
                return None
        return None

    def optional_input(self, node: gs.Node, index: int) -> gs.Tensor | None:
        if index >= len(node.inputs):
            return None
        t = node.inputs[index]
        return None if isinstance(t, gs.Variable) and t.name == "" else t

    def users_besides(self, tensor: gs.Tensor, allowed: gs.Node) -> list[str]:
        users = [self.describe(n) for n in tensor.outputs if n is not allowed]
        if tensor in self.graph.outputs:
            users.append("graph output")
        return users

    def shared_with(self, tensor: gs.Tensor, reader: gs.Node) -> list[str]:
        """Other nodes reading the same constant (directly or through Identity)."""
        others = [self.describe(n) for n in tensor.outputs if n is not reader]
        if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Identity" and tensor.inputs[0].inputs:
            src = tensor.inputs[0].inputs[0]
            others += [self.describe(n) for n in src.outputs if n is not tensor.inputs[0]]
        return others

    # --- rewriting ----------------------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """`hint`, else ``hint_1``, ``hint_2``, ...: the first name no tensor or node of the graph has, nor an
        earlier fresh name (ONNX wants both unique)."""
        name, i = hint, 0
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def new_const(self, hint: str, value: np.ndarray) -> gs.Constant:
        return gs.Constant(self.fresh_name(hint), np.ascontiguousarray(value))

    def replace_input(self, node: gs.Node, index: int, tensor: gs.Tensor) -> None:
        """Set (or append, for index == len) an input; remember when the old one's producer became dead."""
        if index == len(node.inputs):
            node.inputs.append(tensor)
            return
        old = node.inputs[index]
        node.inputs[index] = tensor
        if old.inputs and not old.outputs and old not in self.graph.outputs:
            self._orphaned_producers = True

    def bypass(self, node: gs.Node, keep: gs.Node) -> None:
        """Remove single-output `node`: `keep` (its producer) now writes `node`'s output tensor."""
        out = node.outputs[0]
        node.outputs.clear()
        keep.outputs[0] = out  # first, so `keep`'s old output tensor has no producer when the inputs are dropped
        self._drop_inputs(node)
        self._removed.add(id(node))

    def remove_passthrough(self, node: gs.Node) -> None:
        """Remove single-input `node` whose consumers read its input instead (a no-op once folded)."""
        src, out = node.inputs[0], node.outputs[0]
        for consumer in list(out.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is out:
                    consumer.inputs[i] = src
        node.outputs.clear()
        self._drop_inputs(node)
        self._removed.add(id(node))

    def _drop_inputs(self, node: gs.Node) -> None:
        """Disconnect `node`'s inputs; remember when that leaves a producer (Identity, Constant) unread."""
        old = list(node.inputs)
        node.inputs.clear()
        if any(t.inputs and not t.outputs and t not in self.graph.outputs for t in old):
            self._orphaned_producers = True

    def finish(self) -> None:
        """Drop removed nodes; run a full cleanup only when a rewrite may have left other dead nodes."""
        self.graph.nodes = [n for n in self.graph.nodes if id(n) not in self._removed]
        if self._orphaned_producers:
            self.graph.cleanup()
