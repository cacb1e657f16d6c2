"""The frontend-agnostic half of merge_reparam: the terms of a linear expression, grouped by the tensor their
branches read, and the arithmetic that turns one group into one conv (numpy, float64).

Geometry, per spatial dim. A branch with kernel k, dilation d and paddings (p, e) has tap i reading input position
``out*s + i*d - p``; dilated to dense size ``k' = (k - 1) d + 1`` it is a dilation-1 kernel whose tap j reads
``out*s + j - p``. The merged conv has begin-padding ``P = max p``; the branch lands at offset ``P - p`` and the merged
size is ``K = max(P - p + k')``. The output length ``floor((H + p + e - k') / s) + 1`` is the same for every H
exactly when ``c = p + e - k'`` agrees across branches (else: refused); the merged end-padding is ``c + K - P``.
An identity branch is a 1x1 kernel with no padding (c = -1), allowed with stride 1 and as many input as output
channels: a delta at tap P, per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lkfx import kernel_math as km


@dataclass
class Branch:
    """One term as a conv of the shared input, its BatchNorm already folded in. ``weight is None``: identity,
    ``scale * x + bias`` per channel (a BN-only branch) or plain ``x`` (scale and bias None)."""

    where: str
    weight: np.ndarray | None = None  # (Cout, Cin/groups, *kernel), float64
    bias: np.ndarray | None = None
    stride: tuple[int, ...] = ()
    pads: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # begin, end
    dilation: tuple[int, ...] = ()
    groups: int = 1
    scale: np.ndarray | None = None


@dataclass
class Term:
    """One addend of a linear expression, times the constants on its path (``factors``, e.g. -1, layer scale).

    kind: ``conv`` (a conv, maybe + BN; `key` is the tensor it reads), ``bn`` (a BN alone; `key` is its input),
    ``const`` (a constant; `const` holds it) or ``plain`` (anything else). `branch` is the term as a Branch, or
    the reason it cannot be one; `chain` lists the nodes that merging it removes. `factor_args` are the graph
    values of the factors (``None`` = negate), to rebuild a term that is not merged.
    """

    value: Any
    kind: str
    where: str
    key: Any = None
    branch: Branch | str | None = None
    chain: tuple = ()
    factors: tuple[np.ndarray, ...] = ()
    const: np.ndarray | None = None
    factor_args: tuple = ()


@dataclass
class Merged:
    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, ...]
    pad_begin: tuple[int, ...]
    pad_end: tuple[int, ...]
    groups: int


def group_terms(terms: list[Term]) -> tuple[list[list[Term]], list[Term]]:
    """Groups of terms that read the same tensor, each with a conv and at least two terms; and the rest.

    Convs group by their input. A term that *is* a group's input joins it as an identity (even when it is a
    conv's output itself: that output has another reader, the group's conv, so it could not merge as a branch);
    a BN-only term joins the group of its input as a BN identity. Constants are left in the rest (the caller may
    add them to a bias).
    """
    keys = {id(t.key) for t in terms if t.kind == "conv"}
    identity = {id(t) for t in terms if t.kind != "const" and id(t.value) in keys}
    groups: dict[int, list[Term]] = {}
    for t in terms:
        if t.kind == "conv" and id(t) not in identity:
            groups.setdefault(id(t.key), []).append(t)
    rest = []
    for t in terms:
        if id(t) in identity and id(t.value) in groups:
            where = f"identity {t.where}"
            groups[id(t.value)].append(Term(t.value, "plain", where, t.value, Branch(where), (), t.factors,
                                            factor_args=t.factor_args))
        elif t.kind == "bn" and id(t) not in identity and id(t.key) in groups:
            groups[id(t.key)].append(t)
        elif t.kind != "conv" or id(t) in identity:
            rest.append(t)
    merged = [g for g in groups.values() if len(g) > 1]
    rest += [t for g in groups.values() if len(g) == 1 for t in g]
    return merged, rest


def per_channel(value: np.ndarray, channels: int, nd: int) -> np.ndarray | None:
    """A constant broadcast over (N, C, *spatial) as one value per channel, or None when it is not that."""
    v = np.asarray(value, dtype=np.float64)
    if v.size == 1:
        return np.full(channels, float(v.reshape(())))
    if v.ndim in (nd + 1, nd + 2) and v.shape[-nd - 1:] == (channels,) + (1,) * nd and v.size == channels:
        return v.reshape(channels)
    return None


def coefficient(term: Term, channels: int, nd: int) -> np.ndarray | str:
    coef = np.ones(channels)
    for f in term.factors:
        c = per_channel(f, channels, nd)
        if c is None:
            return f"{term.where} is multiplied by a constant of shape {np.shape(f)}, not one value per channel"
        coef = coef * c
    return coef


def merge(group: list[Term], consts: list[Term]) -> Merged | str:
    """One conv equal to the sum of `group` (+ `consts`), or why there is none."""
    for t in group:
        if isinstance(t.branch, str):
            return t.branch
    convs = [t.branch for t in group if t.branch.weight is not None]
    first = convs[0]
    nd, cout, groups = first.weight.ndim - 2, first.weight.shape[0], first.groups
    cin = first.weight.shape[1] * groups
    for b in convs[1:]:
        for what, mine, theirs in (("stride", first.stride, b.stride), ("groups", first.groups, b.groups),
                                   ("weight shape (out, in/groups)", first.weight.shape[:2], b.weight.shape[:2]),
                                   ("rank", nd, b.weight.ndim - 2)):
            if mine != theirs:
                return f"branches differ in {what}: {first.where} has {mine}, {b.where} has {theirs}"
    for t in group:
        b = t.branch
        if b.weight is None:
            if any(s != 1 for s in first.stride):
                return f"identity branch {b.where} needs stride 1, the convs have stride {first.stride}"
            if cin != cout:
                return f"identity branch {b.where} needs as many input as output channels (convs: {cin} -> {cout})"
            if b.scale is not None and b.scale.shape != (cout,):
                return f"{b.where} has {b.scale.shape[0]} channels, the convs produce {cout}"
        elif b.bias is not None and b.bias.shape != (cout,):
            return f"{b.where} has a bias of {b.bias.shape[0]} values for {cout} output channels"

    def geometry(b: Branch) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if b.weight is None:
            return (0,) * nd, (0,) * nd, (1,) * nd
        dense = tuple((k - 1) * d + 1 for k, d in zip(b.weight.shape[2:], b.dilation, strict=True))
        return b.pads[0], b.pads[1], dense

    geo = [geometry(t.branch) for t in group]
    sizes = [tuple(p + e - k for p, e, k in zip(*g, strict=True)) for g in geo]
    for t, c in zip(group, sizes, strict=True):
        if c != sizes[0]:
            return (f"branches give different output sizes: {group[0].where} (pads {geo[0][:2]}, dense kernel "
                    f"{geo[0][2]}) and {t.where} (pads {geometry(t.branch)[:2]}, dense kernel {geometry(t.branch)[2]})")
    begin = tuple(max(g[0][i] for g in geo) for i in range(nd))
    size = tuple(max(begin[i] - g[0][i] + g[2][i] for g in geo) for i in range(nd))
    end = tuple(sizes[0][i] + size[i] - begin[i] for i in range(nd))

    weight = np.zeros((cout, cin // groups) + size)
    bias = np.zeros(cout)
    for t, (p, _, _) in zip(group, geo, strict=True):
        coef = coefficient(t, cout, nd)
        if isinstance(coef, str):
            return coef
        b = t.branch
        if b.weight is None:
            w = km.identity_kernel(cout, groups, size, begin, weight)
            if b.scale is not None:
                w = w * b.scale.reshape((-1,) + (1,) * (nd + 1))
        else:
            w = km.place_kernel(km.dilate_kernel(b.weight, b.dilation), size,
                                tuple(begin[i] - p[i] for i in range(nd)))
        weight += w * coef.reshape((-1,) + (1,) * (nd + 1))
        if b.bias is not None:
            bias += b.bias * coef
    for t in consts:
        coef = coefficient(t, cout, nd)
        value = per_channel(t.const, cout, nd)
        if isinstance(coef, str) or value is None:
            return f"constant {t.where} of shape {np.shape(t.const)} is not one value per channel"
        bias += value * coef
    return Merged(weight, bias, first.stride, begin, end, groups)


def combine(values: list, leftovers: list[Term], add: Callable, neg: Callable, mul: Callable) -> Any:
    """The expression rebuilt: the merged convs' `values` summed, then each leftover term (its value times its
    factor args, None = negate) added. `add` / `neg` / `mul` make one graph op of the frontend, in this order."""
    value = values[0]
    for v in values[1:]:
        value = add(value, v)
    for t in leftovers:
        v = t.value
        for arg in t.factor_args:
            v = neg(v) if arg is None else mul(v, arg)
        value = add(value, v)
    return value


def merged_note(group: list[Term], bn: str | None, out: str, m: Merged) -> str:
    """The report note for one merged group (and the BatchNorm folded after it)."""
    extra = f" and {bn}" if bn is not None else ""
    return (f"merged {', '.join(t.where for t in group)}{extra} into {out} "
            f"({'x'.join(map(str, m.weight.shape[2:]))})")
