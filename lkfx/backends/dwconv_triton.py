"""Triton kernels for depthwise 2-D convolution (NCHW, one filter per channel), forward and both gradients.

With input ``x[n, c, H, W]``, weight ``w[c, 1, KH, KW]``, strides ``(sh, sw)`` and zero padding ``pt`` (top) /
``pl`` (left) — the bottom / right padding only sets the output size ``OH = (H + pt + pb - KH) // sh + 1``::

    forward      y[n, c, oh, ow]  = b[c] + sum_{kh, kw} w[c, kh, kw] * x[n, c, oh*sh - pt + kh, ow*sw - pl + kw]
    grad input   dx[n, c, ih, iw] = sum_{kh, kw} w[c, kh, kw] * dy[n, c, (ih + pt - kh) / sh, (iw + pl - kw) / sw]
                                    (only where the divisions are exact and land inside the output)
    grad weight  dw[c, kh, kw]    = sum_{n, oh, ow} dy[n, c, oh, ow] * x[n, c, oh*sh - pt + kh, ow*sw - pl + kw]

x outside ``[0, H) x [0, W)`` reads as zero. Each program of the forward / grad-input kernels owns a tile of
``BLOCK_C`` channels x ``BLOCK_H`` x ``BLOCK_W`` pixels of one image and loops over the kernel taps; each tap
is one masked load of the shifted tile and one FMA per pixel into an fp32 accumulator (fp16 / bf16 inputs are
read in their type and accumulated in fp32). Taps that read only padding for the whole tile are not visited:
the loop bounds are the taps that reach the image from some pixel of the tile, e.g. for the forward rows

    kh in [max(0, pt - oh_last * sh), min(KH, H + pt - oh_first * sh))

so a 27x27 kernel on a 14x14 map with 'same' padding visits at most 14 + 13 = 27 rows but a 14x14 tile near the
border visits fewer, and a 63x63 kernel on a 7x7 map visits 7 of 63 rows. Grad weight: one program per
(channel block, kernel row, batch slice) sums ``dy * shifted x`` per tap over the output pixels whose tap lands
inside the image (taps that never do keep their zero); the batch slices' fp32 partial sums are added afterwards
(deterministic, no atomics).

The forward has a second form for large kernels, `forward_tile_dot`: per kernel row, an output row segment is
the product of the input window (loaded once) with a banded Toeplitz matrix of that row's weights, so the input
is reused by all taps from registers (IEEE fp32 products for fp32, tensor cores for fp16 / bf16, fp32
accumulation), at the price of multiplying zeros off the band.

Configurations are autotuned per shape class — the output map's size rounded up to a power of two, the kernel
size rounded up to a power of two (capped at 64), the strides (and the dtypes, part of Triton's key): block sizes,
and for the forward the choice between the direct and the Toeplitz form.
Under ``TRITON_INTERPRET=1`` (CPU, the tests) each kernel keeps one small configuration: the interpreter would
run every configuration for real.

Only stable Triton APIs are used (``triton.jit``, ``triton.autotune``, ``tl.load`` / ``tl.store`` with masks,
``tl.arange``, ``tl.zeros``, ``tl.sum``, ``tl.dot`` with ``input_precision``, runtime-bounded ``range``), so the
kernels run on Triton 3.x. Strides are 1 or 2 (the Toeplitz window is sized for them).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lkfx.backends.dwconv_plugin import output_size

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_KEY = ["size_class", "k_class", "SH", "SW"]


def _configs(options: list[tuple[int, int, int, int]],
             dot_options: list[tuple[int, int, int, int]] | None = None) -> list[triton.Config]:
    """(BLOCK_C, BLOCK_H, BLOCK_W, num_warps) direct options and, for the forward, (BLOCK_H, BLOCK_W, BLOCK_WIN,
    num_warps) Toeplitz options; one tiny direct configuration under the interpreter (which would run them all)."""
    direct_extra = {} if dot_options is None else {"DOT": False, "BLOCK_WIN": 16}
    if _INTERPRET:
        options, dot_options = [(4, 8, 8, 1)], []
    return [triton.Config({"BLOCK_C": c, "BLOCK_H": h, "BLOCK_W": w, **direct_extra}, num_warps=nw)
            for c, h, w, nw in options] + \
        [triton.Config({"BLOCK_C": 1, "BLOCK_H": h, "BLOCK_W": w, "DOT": True, "BLOCK_WIN": win}, num_warps=nw)
         for h, w, win, nw in dot_options or []]


# small maps want many channels per tile (a 7x7 map fills few lanes), large maps wide rows of few channels
TILE_OPTIONS = [
    (1, 16, 32, 4), (1, 32, 32, 4), (2, 16, 16, 4), (4, 8, 16, 4), (4, 16, 16, 4),
    (8, 8, 8, 4), (16, 4, 8, 4), (16, 8, 8, 4), (32, 4, 4, 4), (1, 16, 64, 8), (2, 16, 32, 8),
]
# Toeplitz forward (one channel per program): windows of BLOCK_WIN >= (BLOCK_W - 1) * stride + 2 input columns
# (strides 1 and 2)
DOT_OPTIONS = [(16, 32, 64, 4), (32, 32, 64, 4), (16, 64, 128, 8), (16, 16, 32, 4), (32, 16, 64, 4)]
_WGRAD_OPTIONS = [(16, 8, 16, 4), (32, 8, 8, 4), (8, 16, 16, 4), (4, 16, 32, 4), (64, 4, 4, 4), (16, 16, 16, 8)]


@triton.jit
def forward_tile(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL,
                 SH: tl.constexpr, SW: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The forward tile of program (n * cdiv(C, BLOCK_C) + channel block, row block, column block); shared by
    the autotuned kernel below and the TensorRT plugin's ahead-of-time kernel."""
    n_cb = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // n_cb
    c = (tl.program_id(0) % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    oh0 = tl.program_id(1) * BLOCK_H
    ow0 = tl.program_id(2) * BLOCK_W
    oh = oh0 + tl.arange(0, BLOCK_H)
    ow = ow0 + tl.arange(0, BLOCK_W)
    c_ok = c < C
    plane = (n * C + c).to(tl.int64)
    x_base = x_ptr + plane[:, None, None] * H * W
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
    # taps that reach the image from some pixel of this tile
    oh1 = tl.minimum(oh0 + BLOCK_H, OH) - 1
    ow1 = tl.minimum(ow0 + BLOCK_W, OW) - 1
    kh_lo = tl.maximum(PT - oh1 * SH, 0)
    kh_hi = tl.minimum(H + PT - oh0 * SH, KH)
    kw_lo = tl.maximum(PL - ow1 * SW, 0)
    kw_hi = tl.minimum(W + PL - ow0 * SW, KW)
    iw0 = ow * SW - PL
    w_base = w_ptr + c * (KH * KW)
    for kh in range(kh_lo, kh_hi):
        ih = oh * SH - PT + kh
        row_mask = c_ok[:, None, None] & ((ih >= 0) & (ih < H))[None, :, None]
        x_row = x_base + (ih * W)[None, :, None]
        for kw in range(kw_lo, kw_hi):
            iw = iw0 + kw
            xv = tl.load(x_row + iw[None, None, :], mask=row_mask & ((iw >= 0) & (iw < W))[None, None, :], other=0.0)
            wv = tl.load(w_base + kh * KW + kw, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[:, None, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None, None]
    out_ok = c_ok[:, None, None] & (oh < OH)[None, :, None] & (ow < OW)[None, None, :]
    y_off = plane[:, None, None] * OH * OW + (oh * OW)[None, :, None] + ow[None, None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def forward_tile_dot(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL,
                     SH: tl.constexpr, SW: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_WIN: tl.constexpr):
    """The forward tile of one channel as matrix products (program (n * C + c, row block, column block)).

    Per kernel row kh, one output row segment is ``y[o] += sum_j x[base + j] * T[j, o]`` with the banded
    Toeplitz matrix ``T[j, o] = w[kh, j - o * SW]`` (zero off the band): each input window is loaded once and
    reused by all KW taps from registers, instead of one load per tap. Taps are taken in chunks of
    ``STEP = BLOCK_WIN - (BLOCK_W - 1) * SW`` columns. fp32 multiplies in IEEE fp32 (no TF32), fp16 / bf16 on
    tensor cores; both accumulate in fp32. The band wastes ``BLOCK_WIN / KW`` of the products: the autotuner
    weighs that against the saved loads (large kernels)."""
    STEP: tl.constexpr = BLOCK_WIN - (BLOCK_W - 1) * SW
    plane = tl.program_id(0).to(tl.int64)
    c = tl.program_id(0) % C
    oh0 = tl.program_id(1) * BLOCK_H
    ow0 = tl.program_id(2) * BLOCK_W
    oh = oh0 + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_WIN)
    o = tl.arange(0, BLOCK_W)
    x_plane = x_ptr + plane * H * W
    w_base = w_ptr + c * (KH * KW)
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    oh1 = tl.minimum(oh0 + BLOCK_H, OH) - 1
    ow1 = tl.minimum(ow0 + BLOCK_W, OW) - 1
    kh_lo = tl.maximum(PT - oh1 * SH, 0)
    kh_hi = tl.minimum(H + PT - oh0 * SH, KH)
    kw_lo = tl.maximum(PL - ow1 * SW, 0)
    kw_hi = tl.minimum(W + PL - ow0 * SW, KW)
    for kh in range(kh_lo, kh_hi):
        ih = oh * SH - PT + kh
        row_ok = (ih >= 0) & (ih < H)
        for kw0 in range(kw_lo, kw_hi, STEP):
            iw = ow0 * SW - PL + kw0 + j
            xv = tl.load(x_plane + (ih * W)[:, None] + iw[None, :],
                         mask=row_ok[:, None] & ((iw >= 0) & (iw < W))[None, :], other=0.0)
            tap = kw0 + j[:, None] - (o * SW)[None, :]
            band = (tap >= kw0) & (tap < kw0 + STEP) & (tap < kw_hi)
            t = tl.load(w_base + kh * KW + tap, mask=band, other=0.0)
            if x_ptr.dtype.element_ty == tl.float32:
                acc = tl.dot(xv, t.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xv, t.to(xv.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    ow = ow0 + o
    out_ok = (oh < OH)[:, None] & (ow < OW)[None, :]
    tl.store(y_ptr + plane * OH * OW + (oh * OW)[:, None] + ow[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_ok)


@triton.autotune(configs=_configs(TILE_OPTIONS, DOT_OPTIONS), key=_KEY)
@triton.jit
def _forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL, size_class, k_class,
                    SH: tl.constexpr, SW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                    DOT: tl.constexpr, BLOCK_WIN: tl.constexpr):
    if DOT:
        forward_tile_dot(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL, SH, SW, HAS_BIAS,
                         BLOCK_H, BLOCK_W, BLOCK_WIN)
    else:
        forward_tile(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL, SH, SW, HAS_BIAS,
                     BLOCK_C, BLOCK_H, BLOCK_W)


@triton.autotune(configs=_configs(TILE_OPTIONS), key=_KEY)
@triton.jit
def _grad_input_kernel(dy_ptr, w_ptr, dx_ptr, C, H, W, OH, OW, KH, KW, PT, PL, size_class, k_class,
                       SH: tl.constexpr, SW: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    n_cb = tl.cdiv(C, BLOCK_C)
    n = tl.program_id(0) // n_cb
    c = (tl.program_id(0) % n_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    ih0 = tl.program_id(1) * BLOCK_H
    iw0 = tl.program_id(2) * BLOCK_W
    ih = ih0 + tl.arange(0, BLOCK_H)
    iw = iw0 + tl.arange(0, BLOCK_W)
    c_ok = c < C
    plane = (n * C + c).to(tl.int64)
    dy_base = dy_ptr + plane[:, None, None] * OH * OW
    acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
    # taps through which some pixel of this tile reaches an output: 0 <= ih + PT - kh <= (OH - 1) * SH
    ih1 = tl.minimum(ih0 + BLOCK_H, H) - 1
    iw1 = tl.minimum(iw0 + BLOCK_W, W) - 1
    kh_lo = tl.maximum(ih0 + PT - (OH - 1) * SH, 0)
    kh_hi = tl.minimum(ih1 + PT + 1, KH)
    kw_lo = tl.maximum(iw0 + PL - (OW - 1) * SW, 0)
    kw_hi = tl.minimum(iw1 + PL + 1, KW)
    tw0 = iw + PL
    w_base = w_ptr + c * (KH * KW)
    for kh in range(kh_lo, kh_hi):
        th = ih + PT - kh
        oh = th // SH
        row_mask = c_ok[:, None, None] & ((th >= 0) & (th % SH == 0) & (oh < OH))[None, :, None]
        dy_row = dy_base + (oh * OW)[None, :, None]
        for kw in range(kw_lo, kw_hi):
            tw = tw0 - kw
            ow = tw // SW
            col_ok = (tw >= 0) & (tw % SW == 0) & (ow < OW)
            g = tl.load(dy_row + ow[None, None, :], mask=row_mask & col_ok[None, None, :], other=0.0)
            wv = tl.load(w_base + kh * KW + kw, mask=c_ok, other=0.0)
            acc += g.to(tl.float32) * wv.to(tl.float32)[:, None, None]
    out_ok = c_ok[:, None, None] & (ih < H)[None, :, None] & (iw < W)[None, None, :]
    dx_off = plane[:, None, None] * H * W + (ih * W)[None, :, None] + iw[None, None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=out_ok)


@triton.autotune(configs=_configs(_WGRAD_OPTIONS), key=_KEY)
@triton.jit
def _grad_weight_kernel(dy_ptr, x_ptr, dw_ptr, N, C, H, W, OH, OW, KH, KW, PT, PL, size_class, k_class,
                        SPLIT, SH: tl.constexpr, SW: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    kh = tl.program_id(1)
    part = tl.program_id(2)
    c_ok = c < C
    # output rows whose tap row kh lands inside the image: 0 <= oh * SH - PT + kh < H
    oh_lo = tl.maximum((PT - kh + SH - 1) // SH, 0)
    oh_hi = tl.minimum((H - 1 + PT - kh) // SH + 1, OH)
    # tap columns that reach the image from some output column (others keep their zero gradient)
    kw_lo = tl.maximum(PL - (OW - 1) * SW, 0)
    kw_hi = tl.minimum(W + PL, KW)
    if oh_lo >= oh_hi:
        kw_hi = kw_lo
    for kw in range(kw_lo, kw_hi):
        ow_lo = tl.maximum((PL - kw + SW - 1) // SW, 0)
        ow_hi = tl.minimum((W - 1 + PL - kw) // SW + 1, OW)
        acc = tl.zeros([BLOCK_C, BLOCK_H, BLOCK_W], dtype=tl.float32)
        for n in range(part, N, SPLIT):
            plane = (n * C + c).to(tl.int64)
            for oh0 in range(oh_lo, oh_hi, BLOCK_H):
                oh = oh0 + tl.arange(0, BLOCK_H)
                ih = oh * SH - PT + kh
                row_ok = (oh < oh_hi) & (ih >= 0) & (ih < H)
                for ow0 in range(ow_lo, ow_hi, BLOCK_W):
                    ow = ow0 + tl.arange(0, BLOCK_W)
                    iw = ow * SW - PL + kw
                    col_ok = (ow < ow_hi) & (iw >= 0) & (iw < W)
                    ok = c_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :]
                    g = tl.load(dy_ptr + plane[:, None, None] * OH * OW + (oh * OW)[None, :, None]
                                + ow[None, None, :], mask=ok, other=0.0)
                    xv = tl.load(x_ptr + plane[:, None, None] * H * W + (ih * W)[None, :, None] + iw[None, None, :],
                                 mask=ok, other=0.0)
                    acc += g.to(tl.float32) * xv.to(tl.float32)
        total = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(dw_ptr + (part * C + c) * (KH * KW) + kh * KW + kw, total, mask=c_ok)


@triton.jit
def aot_forward_kernel(x_ptr, w_ptr, b_ptr, C, H, W, OH, OW, KH, KW, PT, PL, y_ptr,
                       SH: tl.constexpr, SW: tl.constexpr,
                       BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    """The forward with a bias, arguments in the order ahead-of-time launchers (TensorRT plugins) use: input
    pointers, int32 scalars, output pointer. Grid: (N * cdiv(C, BLOCK_C), cdiv(OH, BLOCK_H), cdiv(OW, BLOCK_W))."""
    forward_tile(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, OH, OW, KH, KW, PT, PL, SH, SW, True,
                 BLOCK_C, BLOCK_H, BLOCK_W)


AOT_SCALARS = ("C", "H", "W", "OH", "OW", "KH", "KW", "PT", "PL")


def compile_aot_forward(dtype: str, stride: tuple[int, int], tile: tuple[int, int, int, int], target=None):
    """Compile `aot_forward_kernel` for `dtype` ('fp32', 'fp16', 'bf16'), `stride` and a `TILE_OPTIONS` entry,
    for the current GPU or `target` (a ``triton.backends.compiler.GPUTarget``; compiling needs no GPU)."""
    block_c, block_h, block_w, num_warps = tile
    ptr = f"*{dtype}"
    constexprs = {"SH": stride[0], "SW": stride[1], "BLOCK_C": block_c, "BLOCK_H": block_h, "BLOCK_W": block_w}
    signature = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, **dict.fromkeys(AOT_SCALARS, "i32"), "y_ptr": ptr,
                 **dict.fromkeys(constexprs, "constexpr")}
    source = triton.compiler.ASTSource(fn=aot_forward_kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


# --- host side ---------------------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _classes(out_hw: tuple[int, int], kernel: tuple[int, int]) -> dict[str, int]:
    return {"size_class": _pow2(max(out_hw)), "k_class": min(_pow2(max(kernel)), 64)}


def _tile_grid(n: int, c: int, hw: tuple[int, int]):
    return lambda meta: (n * triton.cdiv(c, meta["BLOCK_C"]), triton.cdiv(hw[0], meta["BLOCK_H"]),
                         triton.cdiv(hw[1], meta["BLOCK_W"]))


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int],
            padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Depthwise conv of `x` (N, C, H, W) with `weight` (C, 1, KH, KW); `padding` = (top, left, bottom, right)."""
    x, weight = x.contiguous(), weight.contiguous()
    n, c, h, w = x.shape
    kernel = tuple(weight.shape[2:])
    oh, ow = output_size((h, w), kernel, stride, padding)
    y = torch.empty((n, c, oh, ow), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    b = bias.contiguous() if bias is not None else weight  # never read without HAS_BIAS
    _forward_kernel[_tile_grid(n, c, (oh, ow))](
        x, weight, b, y, c, h, w, oh, ow, kernel[0], kernel[1], padding[0], padding[1],
        **_classes((oh, ow), kernel), SH=stride[0], SW=stride[1], HAS_BIAS=bias is not None)
    return y


def grad_input(dy: torch.Tensor, weight: torch.Tensor, in_size: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Gradient of `forward` with respect to x, for an input map of `in_size` (H, W)."""
    dy, weight = dy.contiguous(), weight.contiguous()
    n, c, oh, ow = dy.shape
    h, w = in_size
    kernel = tuple(weight.shape[2:])
    dx = torch.empty((n, c, h, w), dtype=dy.dtype, device=dy.device)
    if dx.numel() == 0:
        return dx
    _grad_input_kernel[_tile_grid(n, c, (h, w))](
        dy, weight, dx, c, h, w, oh, ow, kernel[0], kernel[1], padding[0], padding[1],
        **_classes((oh, ow), kernel), SH=stride[0], SW=stride[1])
    return dx


def grad_weight(dy: torch.Tensor, x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Gradient of `forward` with respect to the weight, shape (C, 1, KH, KW), in fp32.

    The batch is cut into `split` slices (enough programs to fill a GPU when channels x taps are few), each
    summed by its own programs into an fp32 buffer, then added."""
    dy, x = dy.contiguous(), x.contiguous()
    n, c, h, w = x.shape
    oh, ow = dy.shape[2:]
    split = max(1, min(n, triton.cdiv(8192, c * kernel[0])))
    partial = torch.zeros((split, c, 1, *kernel), dtype=torch.float32, device=x.device)
    if dy.numel() and x.numel():
        grid = lambda meta: (triton.cdiv(c, meta["BLOCK_C"]), kernel[0], split)  # noqa: E731
        _grad_weight_kernel[grid](
            dy, x, partial, n, c, h, w, oh, ow, kernel[0], kernel[1], padding[0], padding[1],
            **_classes((oh, ow), kernel), SPLIT=split, SH=stride[0], SW=stride[1])
    return partial.sum(0)
