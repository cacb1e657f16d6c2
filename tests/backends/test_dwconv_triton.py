"""The Triton depthwise conv kernels, run on the CPU by Triton's interpreter, against PyTorch's conv.

The interpreter is chosen when the kernels are defined (``TRITON_INTERPRET=1`` before lkfx.backends.dwconv_triton
is imported), so the cases run in one subprocess (this file run as a script), leaving this pytest process and its
xdist worker as they were; each test then asserts on its case's errors. Shapes are tiny: the interpreter executes
every tap of every program in numpy.

Tolerances (max |error| / max |reference|, reference: fp32 F.conv2d of the same, already rounded inputs):
fp32 1e-5 for the output and both gradients; fp16 1e-3 and bf16 1e-2 for the output and the input gradient (one
rounding of the fp32 accumulator to the type, 2^-11 and 2^-8 relative, plus the interpreter's conversion); the
weight gradient is returned in fp32 (1e-5 in every type).

The forward runs twice: as autotuned (the interpreter keeps one direct configuration) and with a Toeplitz
configuration (matrix products of input windows with banded weight matrices), launched directly.

The kernels are also compiled for a real GPU (sm_90, PTX and cubin, no GPU needed): the AOT forward that the
TensorRT plugin uses, and the three autotuned kernels with one of their configurations (the forward's Toeplitz
form in fp32, fp16 and bf16 too; bf16 is the one form whose numbers the interpreter cannot check, its tl.dot
multiplying bf16 bit patterns as integers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# name: (batch, channels, H, W, (KH, KW), (sh, sw), (top, left, bottom, right), dtype)
CASES = {
    "k3": (2, 5, 6, 7, (3, 3), (1, 1), (1, 1, 1, 1), "float32"),
    "k7_stride2": (2, 6, 9, 8, (7, 7), (2, 2), (3, 3, 3, 3), "float32"),
    "k13_batch1": (1, 5, 7, 6, (13, 13), (1, 1), (6, 6, 6, 6), "float32"),
    "k31_batch1": (1, 3, 5, 6, (31, 31), (1, 1), (15, 15, 15, 15), "float32"),
    "k31_stride2": (1, 3, 6, 5, (31, 31), (2, 2), (15, 15, 15, 15), "float32"),
    "even_k4_same": (1, 5, 7, 8, (4, 4), (1, 1), (1, 1, 2, 2), "float32"),
    "even_k10_same_stride2": (2, 3, 9, 7, (10, 10), (2, 2), (4, 4, 5, 5), "float32"),
    "rect_k5x3_asym": (2, 5, 8, 9, (5, 3), (2, 1), (0, 2, 3, 0), "float32"),
    "valid_no_pad": (1, 4, 8, 8, (7, 7), (1, 1), (0, 0, 0, 0), "float32"),
    "pad_beyond_kernel": (1, 3, 4, 4, (3, 3), (1, 1), (4, 4, 4, 4), "float32"),
    "fp16_k7": (1, 5, 8, 8, (7, 7), (1, 1), (3, 3, 3, 3), "float16"),
    "bf16_k9_stride2": (1, 5, 8, 7, (9, 9), (2, 2), (4, 4, 4, 4), "bfloat16"),
}
TOL = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


def _run_cases() -> dict:
    """Run every case (this file as a script, under TRITON_INTERPRET=1); {case: {y, dx, dw: error}}."""
    import torch
    import torch.nn.functional as F

    from lkfx.backends import dwconv_triton

    out = {}
    for name, (n, c, h, w, kernel, stride, pads, dtype_name) in CASES.items():
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(len(out))
        x = torch.randn(n, c, h, w, generator=gen).to(dtype)
        weight = torch.randn(c, 1, *kernel, generator=gen).to(dtype)
        bias = torch.randn(c, generator=gen).to(dtype)
        xr = x.float().requires_grad_()
        wr = weight.float().requires_grad_()
        pt, pl, pb, pr = pads
        ref = F.conv2d(F.pad(xr, (pl, pr, pt, pb)), wr, bias.float(), stride, groups=c)
        dy = torch.randn(ref.shape, generator=gen).to(dtype)
        gx, gw = torch.autograd.grad(ref, (xr, wr), dy.float())
        y = dwconv_triton.forward(x, weight, bias, stride, pads)
        # Triton's interpreter keeps bf16 as uint16 bit patterns and its tl.dot multiplies those as integers
        y_dot = _forward_toeplitz(x, weight, bias, stride, pads) if dtype != torch.bfloat16 else None
        dx = dwconv_triton.grad_input(dy, weight, (h, w), stride, pads)
        dw = dwconv_triton.grad_weight(dy, x, kernel, stride, pads)

        def err(a, b):
            return float((a.float() - b).abs().max() / b.abs().max())

        out[name] = {"y": err(y, ref.detach()), "y_dot": None if y_dot is None else err(y_dot, ref.detach()),
                     "dx": err(dx, gx), "dw": err(dw, gw),
                     "shapes_ok": y.shape == ref.shape and dx.shape == x.shape and dw.shape == weight.shape,
                     "dtype_ok": y.dtype == dtype and dx.dtype == dtype}
    return out


def _interpret() -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _forward_toeplitz(x, weight, bias, stride, pads):
    """The forward kernel with a Toeplitz configuration (the interpreter's autotuner keeps a direct one)."""
    import torch
    import triton

    from lkfx.backends import dwconv_triton

    n, c, h, w = x.shape
    oh, ow = dwconv_triton.output_size((h, w), weight.shape[2:], stride, pads)
    y = torch.empty((n, c, oh, ow), dtype=x.dtype)
    block_h, block_w, block_win = 16, 16, 32
    grid = (n * c, triton.cdiv(oh, block_h), triton.cdiv(ow, block_w))
    dwconv_triton._forward_kernel.fn[grid](
        x, weight, bias, y, c, h, w, oh, ow, *weight.shape[2:], pads[0], pads[1], 0, 0, SH=stride[0], SW=stride[1],
        HAS_BIAS=True, BLOCK_C=1, BLOCK_H=block_h, BLOCK_W=block_w, DOT=True, BLOCK_WIN=block_win)
    return y


@pytest.fixture(scope="session")
def results(tmp_path_factory, request) -> dict:
    """The cases' errors, computed once per test run: under xdist the workers share one file (the first to take
    the lock runs the interpreter, ~20 s of CPU)."""
    worker = getattr(request.config, "workerinput", {}).get("workerid")
    if worker is None:
        return _interpret()
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "dwconv_interpret.json"  # this run's folder, all workers
    with FileLock(f"{shared}.lock"):
        if not shared.is_file():
            shared.write_text(json.dumps(_interpret()))
        return json.loads(shared.read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_conv2d(results, case):
    r = results[case]
    tol = TOL[CASES[case][-1]]
    assert r["shapes_ok"] and r["dtype_ok"]
    assert r["y"] <= tol, f"forward error {r['y']:.3g} > {tol:g}"
    if r["y_dot"] is not None:  # None: bf16, which the interpreter's tl.dot cannot do (compiled for sm_90 below)
        assert r["y_dot"] <= tol, f"Toeplitz forward error {r['y_dot']:.3g} > {tol:g}"
    assert r["dx"] <= tol, f"grad input error {r['dx']:.3g} > {tol:g}"
    assert r["dw"] <= 1e-5, f"grad weight error {r['dw']:.3g} > 1e-5"


def test_channels_not_a_multiple_of_the_block():
    # the interpreter runs BLOCK_C = 4: these cases leave a partial channel block
    assert any(CASES[c][1] % 4 for c in CASES)
    assert {3, 7, 13, 31} <= {CASES[c][4][0] for c in CASES}


def test_kernels_compile_for_a_gpu():
    """TTIR -> PTX -> cubin for sm_90 with the NVIDIA backend, as on the benchmark's H100; no GPU needed."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    from lkfx.backends import dwconv_triton as dt

    target = GPUTarget("cuda", 90, 32)
    for dtype in ("fp32", "fp16", "bf16"):
        compiled = dt.compile_aot_forward(dtype, (2, 2), dt.TILE_OPTIONS[3], target=target)
        assert "aot_forward_kernel" in compiled.asm["ptx"] and compiled.asm["cubin"]
    ptr, i32 = "*fp32", "i32"
    tiles = {"BLOCK_C": 8, "BLOCK_H": 8, "BLOCK_W": 16}
    common = dict.fromkeys(("C", "H", "W", "OH", "OW", "KH", "KW", "PT", "PL", "size_class", "k_class"), i32)
    kernels = [
        (dt._forward_kernel, {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, **common},
         {"SH": 1, "SW": 1, "HAS_BIAS": True, "DOT": False, "BLOCK_WIN": 16}),
        (dt._forward_kernel, {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, **common},
         {"SH": 2, "SW": 2, "HAS_BIAS": True, "DOT": True, "BLOCK_WIN": 64, "BLOCK_C": 1, "BLOCK_H": 16,
          "BLOCK_W": 32}),
        *((dt._forward_kernel, {"x_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "y_ptr": f"*{t}", **common},
           {"SH": 1, "SW": 1, "HAS_BIAS": False, "DOT": True, "BLOCK_WIN": 64, "BLOCK_C": 1, "BLOCK_H": 16,
            "BLOCK_W": 32}) for t in ("fp16", "bf16")),
        (dt._grad_input_kernel, {"dy_ptr": ptr, "w_ptr": ptr, "dx_ptr": ptr, **common}, {"SH": 2, "SW": 2}),
        (dt._grad_weight_kernel, {"dy_ptr": ptr, "x_ptr": ptr, "dw_ptr": ptr, "N": i32, **common, "SPLIT": i32},
         {"SH": 1, "SW": 2}),
    ]
    for autotuned, signature, constexprs in kernels:
        constexprs = {**tiles, **constexprs}
        source = triton.compiler.ASTSource(fn=autotuned.fn, signature={**signature, **dict.fromkeys(
            constexprs, "constexpr")}, constexprs=constexprs)
        assert triton.compile(source, target=target, options={"num_warps": 4}).asm["cubin"]


if __name__ == "__main__":
    print(json.dumps(_run_cases()))
