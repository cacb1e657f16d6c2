"""FFT convolution: grid sizes (`fft_plan`) and the direct-vs-FFT cost model (`CostModel`).

Plan. A stride-1 conv with begin/end zero padding ``pb, pe`` on an ``n``-long axis reads, for output ``o``, the
inputs ``x[o + m - pb]``, ``m < k``, and has ``n + pb + pe - k + 1`` outputs. Taps that no output can bring onto
the input (``m - pb`` outside ``[-(outputs-1), n-1]``, only when the kernel is larger than the map) are cropped
away, which shifts the begin padding to ``s``. On a circular grid of size ``N`` the kernel is placed at
``(m - s) mod N``; the circular correlation ``c = irfft(rfft(x) * conj(rfft(kernel)))`` then reads
``x[(o + m - s) mod N]``, which equals the zero-padded ``x[o + m - s]`` as long as the indices that wrap
(``-s .. -1``) and those past the end (``n .. n + e - 1``) land in the zero tail: ``N >= n + max(s, e)``. With
``N >= kernel`` and ``N >= outputs`` this is the whole condition, tighter than the textbook ``n + k - 1`` (for
'same' padding ``n + (k - 1) / 2``), and the output is ``c[0 : outputs]``: no shift, no wrap-around.
``N`` is then rounded up to a fast FFT length: even and 5-smooth (2^a 3^b 5^c) for PyTorch, powers of 2 for
ONNX Runtime, whose CPU DFT is a naive O(N^2) loop for other lengths.

Cost model. Times in seconds, from the conv's shape alone; ``t0`` are fixed costs per call, ``byte_s`` the
cost of moving one byte (a copy)::

    direct = t0_conv + max(MACs * mac_s[kind][k], (bytes in + out) * byte_s)
    fft    = t0_fft + 3 t0_op
             + (B Cin + B Cout) N M log2(N M) * (fft_s[N] + fft_s[M]) / 2    forward + inverse transforms
             + B Cout N (M/2+1) * cmul_s          (depthwise: one complex product per frequency)
             | B Cout Cin N (M/2+1) * cmac_s      (dense: complex matrix product per frequency)
             + (spectrum product, padded copy, crop and bias bytes) * byte_s

``mac_s`` is a table per kernel size, because direct convs change algorithm with the kernel: on x86 CPUs
PyTorch's depthwise conv runs ~40 GMAC/s per core up to 13x13 and ~2.5 GMAC/s from 14x14 on (oneDNN's fast
depthwise kernel stops there), a 15x cliff that a FLOP count alone cannot see. ``fft_s`` is a table per FFT
length (the even 5-smooth lengths up to 128), because the speed per point depends on the radices. `calibrate`
measures every constant once per machine (device, threads, torch version) in under a second, and
`cost_model` caches them in ``$LKFX_CACHE_DIR/fft_cost.json`` (default ``~/.cache/lkfx``). The prediction
assumes inference: the kernel spectrum is cached, as `lkfx.modules.fft_conv.FFTConv2d` does.

Accuracy, measured on a loaded 2-core x86 machine against PyTorch 2.14 (depthwise, batch 8, maps 7-56): direct
predictions 0.7-1.35x of the measured time, FFT predictions 0.5-0.8x (optimistic: the rates are measured on
small batches, and at full size the transforms leave the caches). Hence FFT is chosen only when predicted
``FFT_MARGIN`` (1.25x) faster. On such CPUs the decision is rarely close: from 14x14 on, direct depthwise convs
are 5-30x slower than the FFT.

Policy: kernels below ``MIN_FFT_KERNEL`` on both sides never take the FFT path (direct and Winograd convs are
tuned for them, and the FFT would add rounding error for nothing).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIN_FFT_KERNEL = 5
FFT_MARGIN = 1.25
TORCH_RADICES = (2, 3, 5)
ONNX_RADICES = (2,)
CACHE_FILE = "fft_cost.json"
_FORMAT = 2

Pads = tuple[tuple[int, int], ...]


def fast_size(n: int, radices: Sequence[int] = TORCH_RADICES) -> int:
    """The smallest even m >= n whose prime factors are all in `radices` (even: a real FFT of odd length runs at
    about 60% of the speed per point of its even neighbours, measured with PyTorch on x86)."""
    m = max(int(n), 2)
    while True:
        rest = m
        if rest % 2:
            m += 1
            continue
        for r in radices:
            while rest % r == 0:
                rest //= r
        if rest == 1:
            return m
        m += 1


@dataclass(frozen=True)
class FFTPlan:
    """Per spatial axis: output length, FFT grid length, kernel taps kept ``[lo, hi)``, begin padding of the
    kept taps (the kernel is rolled by minus this on the grid)."""

    out: tuple[int, ...]
    size: tuple[int, ...]
    taps: tuple[tuple[int, int], ...]
    shift: tuple[int, ...]


def fft_plan(in_size: Sequence[int], kernel: Sequence[int], pads: Pads,
             radices: Sequence[int] = TORCH_RADICES) -> FFTPlan:
    """Grid and crop for a stride-1 conv of a `kernel` over `in_size` with (begin, end) zero `pads` per axis."""
    out, size, taps, shift = [], [], [], []
    for n, k, (pb, pe) in zip(in_size, kernel, pads, strict=True):
        o = n + pb + pe - k + 1
        if o < 1 or min(pb, pe) < 0:
            raise ValueError(f"a {k}-tap kernel with padding ({pb}, {pe}) has no output on a {n}-long axis")
        lo, hi = max(0, pb - o + 1), min(k, pb + n)
        s = pb - lo
        e = o - n - s + (hi - lo) - 1
        out.append(o)
        size.append(fast_size(max(n + max(s, e), hi - lo, o), radices))
        taps.append((lo, hi))
        shift.append(s)
    return FFTPlan(tuple(out), tuple(size), tuple(taps), tuple(shift))


@dataclass(frozen=True)
class ConvShape:
    """What the cost model needs to know about one conv call (2-D, stride 1)."""

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    in_size: tuple[int, int]
    kernel: tuple[int, int]
    pads: Pads

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    def describe(self) -> str:
        kind = "depthwise" if self.depthwise else "dense"
        return (f"{kind} {'x'.join(map(str, self.kernel))} on {self.batch}x{self.in_channels}x"
                f"{'x'.join(map(str, self.in_size))}")


@dataclass(frozen=True)
class Decision:
    fft: bool
    direct_s: float
    fft_s: float
    reason: str


def _lookup(table: dict[int, float], key: float) -> float:
    """Value at the smallest calibrated key >= `key` (the largest key past the table): an uncalibrated kernel
    size gets the rate of the next larger one, on the slow side of any cliff between them."""
    keys = sorted(table)
    above = [k for k in keys if k >= key]
    return table[above[0] if above else keys[-1]]


def _interp_log(table: dict[int, float], key: float) -> float:
    """Piecewise-linear in log2(key) between calibrated keys, constant outside."""
    keys = sorted(table)
    if key <= keys[0]:
        return table[keys[0]]
    if key >= keys[-1]:
        return table[keys[-1]]
    for a, b in zip(keys, keys[1:], strict=False):
        if a <= key <= b:
            t = (math.log2(key) - math.log2(a)) / (math.log2(b) - math.log2(a))
            return table[a] + t * (table[b] - table[a])
    raise AssertionError("unreachable: key inside the table's range")


class CostModel:
    """Predicts the time of one conv call computed directly and by FFT, from measured `constants`."""

    def __init__(self, constants: dict[str, Any]):
        c = constants
        self.constants = c
        self.t0 = {kind: float(c[f"{kind}_t0_s"]) for kind in ("conv", "fft", "op")}
        self.byte_s = float(c["byte_s"])
        self.cmul_s = float(c["cmul_s"])
        self.cmac_s = float(c["cmac_s"])
        self.mac_s = {kind: {int(k): float(v) for k, v in c[f"{kind}_mac_s"].items()} for kind in ("dw", "dense")}
        self.fft_s = {int(k): float(v) for k, v in c["fft_s"].items()}  # by FFT length

    def direct_seconds(self, c: ConvShape) -> float:
        (h, w), (kh, kw) = c.in_size, c.kernel
        ho, wo = h + sum(c.pads[0]) - kh + 1, w + sum(c.pads[1]) - kw + 1
        macs = c.batch * c.out_channels * ho * wo * (c.in_channels // c.groups) * kh * kw
        rate = _lookup(self.mac_s["dw" if c.depthwise else "dense"], max(kh, kw))
        moved = 4 * c.batch * (c.in_channels * h * w + c.out_channels * ho * wo)
        return self.t0["conv"] + max(macs * rate, moved * self.byte_s)

    def fft_seconds(self, c: ConvShape) -> float:
        p = fft_plan(c.in_size, c.kernel, c.pads)
        n, m = p.size
        points, freqs = n * m, n * (m // 2 + 1)
        planes = c.batch * (c.in_channels + c.out_channels) / 2  # forward + inverse transform pairs
        rate = (self._fft(n) + self._fft(m)) / 2
        transforms = planes * 2 * points * math.log2(max(points, 2)) * rate
        if c.groups == 1:
            mix = c.batch * c.out_channels * c.in_channels * freqs * self.cmac_s
        else:
            mix = c.batch * c.out_channels * freqs * self.cmul_s
        moved = (8 * c.batch * (c.in_channels + c.out_channels) * freqs  # spectrum product: read, write
                 + 4 * c.batch * (c.in_channels * (c.in_size[0] * c.in_size[1] + points)  # padded copy
                                  + 2 * c.out_channels * p.out[0] * p.out[1]))  # crop and bias
        return self.t0["fft"] + 3 * self.t0["op"] + transforms + mix + moved * self.byte_s

    def _fft(self, n: int) -> float:
        return _interp_log(self.fft_s, n)

    def choose(self, c: ConvShape) -> Decision:
        """FFT when predicted FFT_MARGIN times faster, never for kernels below MIN_FFT_KERNEL on both sides."""
        direct = self.direct_seconds(c)
        if max(c.kernel) < MIN_FFT_KERNEL:
            return Decision(False, direct, math.inf,
                            f"kernels below {MIN_FFT_KERNEL}x{MIN_FFT_KERNEL} always run direct")
        fft = self.fft_seconds(c)
        ms = f"predicted FFT {fft * 1e3:.3g} ms vs direct {direct * 1e3:.3g} ms"
        return Decision(fft * FFT_MARGIN < direct, direct, fft, ms)


# --- calibration ---------------------------------------------------------------------------------------------
DW_KERNELS = tuple(range(3, 34, 2))
DENSE_KERNELS = (3, 5, 7, 9, 13, 17, 21, 25, 33)
FFT_SIDES = tuple(n for n in range(8, 129) if fast_size(n) == n)


def calibrate(device: str = "cpu", rounds: int = 3, target_s: float = 3e-4) -> dict[str, Any]:
    """Measure the cost model's constants on `device` with torch's current thread count (~0.5 s on an idle CPU).

    Each workload (a depthwise or dense conv per kernel size, an FFT round trip per length, a complex product,
    a 4 MB copy) is grown by its batch until one call takes about `target_s`, then timed at that batch and at
    twice it: the rate is the slope (seconds per unit of work), the intercept the fixed cost of one call (about
    50 us for a oneDNN conv), of which each kind keeps the median. Small workloads predict large ones (measured:
    a 512-plane 64x64 FFT runs at the per-point speed of a 16-plane one). All workloads are timed once per round
    and each keeps its fastest call over `rounds` rounds: a burst of load from other processes spoils one
    round, not one workload.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(dev)

    def once(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def conv(x, w, groups: int):
        k = w.shape[-1]
        y_numel = F.conv2d(x[:1], w, padding=k // 2, groups=groups).numel()

        def make(batch: int):
            xb = x.expand(batch, -1, -1, -1).contiguous()
            return (lambda: F.conv2d(xb, w, padding=k // 2, groups=groups)), batch * y_numel * w.shape[1] * k * k
        return make

    def fft(n: int):
        def make(batch: int):
            x = randn(batch * max(4, 4096 // (n * n)), n, n)
            return (lambda: torch.fft.irfft2(torch.fft.rfft2(x), s=(n, n))), 2 * x.numel() * math.log2(n * n)
        return make

    def copy(batch: int):
        x = randn(batch, 1 << 20)
        return x.clone, 8 * x.numel()

    def cmul(batch: int):
        a, b = randn(batch, 16, 32, 17, dtype=torch.complex64), randn(16, 32, 17, dtype=torch.complex64)
        return (lambda: a * b), a.numel()

    def cmac(batch: int):
        a, b = randn(batch, 32, 16, 17, dtype=torch.complex64), randn(32, 32, 16, 17, dtype=torch.complex64)
        return (lambda: torch.einsum("bihw,oihw->bohw", a, b)), batch * 32 * b.numel()

    # (name, key) -> (make(batch) -> (call, work), which fixed per-call cost it shares)
    workloads: dict[tuple[str, int], tuple[Callable[[int], Any], str]] = {}
    for k in DW_KERNELS:
        workloads[("dw_mac_s", k)] = (conv(randn(1, 16, 16, 16), randn(16, 1, k, k), 16), "conv")
    for k in DENSE_KERNELS:
        workloads[("dense_mac_s", k)] = (conv(randn(1, 16, 16, 16), randn(16, 16, k, k), 1), "conv")
    for n in FFT_SIDES:
        workloads[("fft_s", n)] = (fft(n), "fft")
    workloads[("cmul_s", 0)] = (cmul, "op")
    workloads[("cmac_s", 0)] = (cmac, "op")
    workloads[("byte_s", 0)] = (copy, "op")

    with torch.inference_mode():
        runs = {}  # (key, size) -> (call, work)
        for key, (make, _) in workloads.items():
            fn, _ = make(1)
            once(fn)  # warm-up
            batch = max(1, min(32, round(target_s / max(once(fn), 1e-7))))
            for size, b in enumerate((batch, 2 * batch)):
                fn, work = make(b)
                once(fn)  # warm-up at this size (oneDNN builds a kernel per shape)
                runs[(key, size)] = (fn, work)
        fastest = dict.fromkeys(runs, math.inf)
        for _ in range(rounds):
            for run, (fn, _) in runs.items():
                fastest[run] = min(fastest[run], once(fn))
    out: dict[str, Any] = {"dw_mac_s": {}, "dense_mac_s": {}, "fft_s": {}}
    fixed: dict[str, list[float]] = {"conv": [], "fft": [], "op": []}
    for (name, k), (_, kind) in workloads.items():
        (t1, (_, w1)), (t2, (_, w2)) = ((fastest[((name, k), i)], runs[((name, k), i)]) for i in (0, 1))
        rate = min(max((t2 - t1) / (w2 - w1), 0.5 * t2 / w2), t2 / w2)  # slope, within noise bounds
        fixed[kind].append(max(t1 - w1 * rate, 0.0))
        if isinstance(out.get(name), dict):
            out[name][k] = rate
        else:
            out[name] = rate
    for kind, values in fixed.items():
        out[f"{kind}_t0_s"] = statistics.median(values)
    return out


def cache_dir() -> Path:
    """``$LKFX_CACHE_DIR``, else ``$XDG_CACHE_HOME/lkfx``, else ``~/.cache/lkfx``."""
    if os.environ.get("LKFX_CACHE_DIR"):
        return Path(os.environ["LKFX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lkfx"


def machine_key(device: str = "cpu") -> str:
    """Which measurements apply: host, processor, device, torch version and thread count."""
    import torch

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return f"{platform.node()}|{name}|{dev.type}|torch {torch.__version__}|threads {torch.get_num_threads()}"


_loaded: dict[tuple[str, str], CostModel] = {}


def cost_model(device: str = "cpu") -> CostModel:
    """The cost model of this machine for `device`: from the cache file, or calibrated now and saved there."""
    key = machine_key(device)
    path = cache_dir() / CACHE_FILE
    if (str(path), key) in _loaded:
        return _loaded[(str(path), key)]
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            data = {}
    except (OSError, ValueError):
        data = {}
    machines = data.get("machines", {})
    if key in machines:
        try:
            model = CostModel(machines[key])
        except (KeyError, TypeError, ValueError):
            model = None
    else:
        model = None
    if model is None:
        model = CostModel(calibrate(device))
        machines[key] = model.constants
        _write_atomic(path, json.dumps({"format": _FORMAT, "machines": machines}, indent=1))
    _loaded[(str(path), key)] = model
    return model


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
