"""Weight arithmetic shared by the torch.fx and ONNX frontends.

Every function works on numpy arrays and torch tensors alike (only `*`, `+`, `**`, `reshape`, `sum` and slice
assignment into zeros are used), so each formula exists once. Callers pass float64 values and cast the result back.

BatchNorm at inference is a per-channel affine map ``bn(y) = s * y + t`` with::

    s = gamma / sqrt(var + eps)          (gamma = 1 when the BN has no affine weight)
    t = beta - mean * s                  (beta = 0 when the BN has no affine bias)

BN after a conv (output channel o)::

    s[o] * (W x + b)[o] + t[o]  =  (s[o] W[o]) x + (s[o] b[o] + t[o])

A ConvTranspose keeps output channels on weight axis 1, per group: ``W`` has shape (Cin, Cout/g, k...) and
output channel ``o = group * Cout/g + j`` is ``W[group * Cin/g : (group+1) * Cin/g, j]``.

BN before a conv (input channel i, group of output channel o is g(o))::

    W (s x + t) + b  =  (W diag(s)) x + (b[o] + sum_{j,k} W[o, j, k] t[g(o) Cin/g + j])

This is exact only when every tap of W sees ``s x + t``: a zero-padded conv would see ``0`` at the border
instead of ``t`` — the caller refuses that case.
"""

from __future__ import annotations

from typing import Any

Array = Any  # numpy.ndarray or torch.Tensor


def bn_scale_shift(mean: Array, var: Array, gamma: Array | None, beta: Array | None, eps: float) -> tuple[Array, Array]:
    """Return (s, t) such that batch_norm(y) == s * y + t per channel."""
    s = (var + eps) ** -0.5
    if gamma is not None:
        s = s * gamma
    t = -mean * s
    if beta is not None:
        t = t + beta
    return s, t


def fold_scale_after(w: Array, b: Array | None, s: Array, t: Array, *, transposed: bool = False, groups: int = 1):
    """Fold ``y -> s * y + t`` into the conv/linear that produced y. Returns (W', b')."""
    if transposed:
        cin, cout_g = w.shape[0], w.shape[1]
        spatial = (1,) * (w.ndim - 2)
        w2 = w.reshape((groups, cin // groups, cout_g) + tuple(w.shape[2:])) * s.reshape((groups, 1, cout_g) + spatial)
        w2 = w2.reshape(tuple(w.shape))
    else:
        w2 = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    b2 = t if b is None else b * s + t
    return w2, b2


def fold_scale_before(w: Array, b: Array | None, s: Array, t: Array, *, groups: int = 1):
    """Fold ``x -> s * x + t`` (per input channel) into the conv/linear that consumes it. Returns (W', b').

    Only exact when the conv does no zero padding (see the module docstring).
    """
    cout, cin_g = w.shape[0], w.shape[1]
    ks = tuple(w.shape[2:])
    one = (1,) * len(ks)
    wg = w.reshape((groups, cout // groups, cin_g) + ks)
    w2 = (wg * s.reshape((groups, 1, cin_g) + one)).reshape(tuple(w.shape))
    shift = (wg * t.reshape((groups, 1, cin_g) + one)).sum(axis=tuple(range(2, 3 + len(ks)))).reshape((cout,))
    b2 = shift if b is None else b + shift
    return w2, b2


# --- kernels of different shapes: dilation, placement, identity --------------------------------------------
#
# A conv tap i (per spatial dim) with dilation d and begin-padding p reads input position ``out*stride + i*d - p``.
# Inserting d - 1 zeros between the taps gives a dense kernel of size (k - 1) d + 1 whose tap j reads
# ``out*stride + j - p``: the same conv with dilation 1. A kernel placed at `offset` inside a larger zero kernel
# with begin-padding P reads ``out*stride + (j + offset) - P``: unchanged when ``offset = P - p``.


def _zeros(like: Array, shape: tuple[int, ...]) -> Array:
    if hasattr(like, "new_zeros"):  # torch
        return like.new_zeros(shape)
    import numpy as np

    return np.zeros(shape, dtype=like.dtype)


def dilate_kernel(w: Array, dilation: tuple[int, ...]) -> Array:
    """The dense kernel equal to `w` applied with `dilation` (zeros between the taps); dilation 1 returns `w`."""
    ks = tuple(w.shape[2:])
    if all(d == 1 for d in dilation):
        return w
    out = _zeros(w, tuple(w.shape[:2]) + tuple((k - 1) * d + 1 for k, d in zip(ks, dilation, strict=True)))
    out[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)] = w
    return out


def place_kernel(w: Array, size: tuple[int, ...], offset: tuple[int, ...]) -> Array:
    """`w` zero-padded into a kernel of spatial `size`, its first tap at `offset` (per spatial dim)."""
    ks = tuple(w.shape[2:])
    if any(o < 0 or o + k > s for o, k, s in zip(offset, ks, size, strict=True)):
        raise ValueError(f"a {ks} kernel at offset {offset} does not fit in {size}")
    out = _zeros(w, tuple(w.shape[:2]) + tuple(size))
    out[(slice(None), slice(None)) + tuple(slice(o, o + k) for o, k in zip(offset, ks, strict=True))] = w
    return out


def identity_kernel(channels: int, groups: int, size: tuple[int, ...], center: tuple[int, ...], like: Array) -> Array:
    """The conv weight (channels, channels/groups, *size) computing y = x: output channel o reads its own input
    channel, which is index ``o % (channels/groups)`` inside its group, with a single 1 at tap `center`."""
    cin_g = channels // groups
    out = _zeros(like, (channels, cin_g) + tuple(size))
    out[(list(range(channels)), [o % cin_g for o in range(channels)]) + tuple(center)] = 1
    return out
