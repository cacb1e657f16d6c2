"""Where ``fake_quant`` puts activation quantizers, written once for torch.fx and ONNX.

The rule works on values: an fx.Node on torch.fx, a tensor on ONNX. A frontend gives, for one value, whether a
quantized layer (conv, linear, matmul) computes it, and the activation values it is computed from (constants,
weights and shape values left out, so a shared constant is no common ancestor).

Residual add (``placement="tensorrt"``, NVIDIA ModelOpt's rule for conv nets): ``a + b`` where ``a`` comes straight
from a quantized layer and ``b`` does not: TensorRT fuses the layer with the add and reads ``b`` as int8, so only
``b`` (the skip) is quantized and ``a`` stays float. When both come from layers (ResNet's downsample block), the
skip is the one with the shorter path back to where the two branches split (the downsample conv); equal paths: no
skip. When ``b`` is computed from ``a``'s own layer output (``y + sigmoid(y)``), the add is no residual: nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def residual_skip(values: Sequence[Any], is_layer: Callable[[Any], bool],
                  parents: Callable[[Any], Iterable[Any]]) -> int | None:
    """The index (0 or 1) of the input of a residual add to quantize, or None when the add is not a residual."""
    from_layer = [is_layer(v) for v in values]
    if not any(from_layer):
        return None
    split, depths = split_point(values, parents)
    if all(from_layer):
        return None if depths[0] == depths[1] else 0 if depths[0] < depths[1] else 1
    layer = 0 if from_layer[0] else 1
    return None if split is values[layer] else 1 - layer


def split_point(values: Sequence[Any], parents: Callable[[Any], Iterable[Any]]) -> tuple[Any, tuple[int, int]]:
    """The nearest common ancestor of two values (None if there is none) and each one's distance to it, by
    breadth-first search backwards from both at once: the cost is the size of the block, not of the graph."""
    seen: list[dict[int, tuple[Any, int]]] = [{id(v): (v, 0)} for v in values]
    frontiers = [[v] for v in values]
    while any(frontiers):
        for side in (0, 1):
            common = [k for k in seen[side] if k in seen[1 - side]]
            if common:
                k = min(common, key=lambda c: seen[0][c][1] + seen[1][c][1])
                return seen[0][k][0], (seen[0][k][1], seen[1][k][1])
            nxt = []
            for value in frontiers[side]:
                depth = seen[side][id(value)][1] + 1
                for parent in parents(value):
                    if id(parent) not in seen[side]:
                        seen[side][id(parent)] = (parent, depth)
                        nxt.append(parent)
            frontiers[side] = nxt
    return None, (0, 0)
