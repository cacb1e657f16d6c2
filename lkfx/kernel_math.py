"""Weight arithmetic shared by the torch.fx and ONNX frontends.

Every function works on numpy arrays and torch tensors alike (only `*`, `+`, `**`, `reshape` and `sum` are
used), so each formula exists once. Callers pass float64 values and cast the result back.

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
