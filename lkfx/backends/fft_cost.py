"""FFT convolution: grid sizes (`fft_plan`) and the cost model of a conv's CPU implementations (`CostModel`).

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

Cost model. Three candidates per conv, times in seconds from the conv's shape alone; ``t0`` are fixed costs per
call, ``byte_s`` the cost of moving one byte (a copy), ``convert_s`` of moving one byte between the NCHW and the
channels-last (NHWC) layout::

    nchw          = t0_conv + max(MACs * dw_mac_s[k], (bytes in + out) * byte_s)       [+ convert]
    channels_last = t0_conv + max(used MACs * dw_cl_mac_s[k], (bytes in + out) * byte_s) [+ convert]
    convert       = 2 t0_op + (bytes in + out) * convert_s     (only for the layout the neighbours do not have)
    fft           = t0_fft + 4 t0_op
                    + (B Cin (1 + H/N) + B Cout (1 + Ho/N)) / 2 * N M log2(N M) * (fft_s[N] + fft_s[M]) / 2
                    + B Cout N (M/2+1) * cmul_s         (depthwise: one complex product per frequency)
                    | B Cout Cin N (M/2+1) * cmac_s     (dense: complex matrix product per frequency)
                    + (spectrum product, crop) bytes * byte_s
                    [+ convert]     (channels-last neighbours: transforms through the strides cost about that)

The transforms term follows `lkfx.modules.fft_conv.apply_spectrum`, which transforms the W axis of the H input
rows and of the Ho output rows only. ``mac_s`` are tables per kernel size, because direct convs change algorithm
with the kernel: on x86 CPUs PyTorch's NCHW depthwise conv runs ~40 GMAC/s per core up to 13x13 and ~2.5 GMAC/s
from 14x14 on (oneDNN's fast depthwise kernel stops there), a 15x cliff that a FLOP count alone cannot see; the
channels-last depthwise conv (oneDNN, which inductor and ``model.to(memory_format=torch.channels_last)`` use)
has no cliff and skips the taps that fall on padding, so it is priced by the MACs that read the input
(`taps_used`): per such MAC its rate is the same within 2x from 16x16 to 56x56 maps and 7 to 51 taps, while per
MAC of the full window it varies 8x. Dense convs are priced with one table in both layouts. ``fft_s`` is a table
per FFT length (the even 5-smooth lengths up to 128), because the speed per point depends on the radices.
`calibrate` measures every constant once per machine (device, threads, torch version) in about a second, and
`cost_model` caches them in ``$LKFX_CACHE_DIR/fft_cost.json`` (default ``~/.cache/lkfx``). The prediction
assumes inference: the kernel spectrum is cached, as `lkfx.modules.fft_conv.FFTConv2d` does.

Accuracy, measured on a loaded 2-core x86 machine against PyTorch 2.14 (depthwise, batch 1 and 8, RepLKNet and
SLaK shapes, maps 7-56, kernels 7-51): direct predictions 0.7-1.2x of the measured time (0.3x for channels-last
convs on 7x7 maps, where fixed costs dominate), FFT predictions 0.7-1.15x (the calibration's transforms run in
cache; `apply_spectrum` runs a depthwise conv's channels in cache-sized chunks so that large batches stay
close to that, where unchunked they were up to 3x slower than predicted). Hence FFT is chosen only when
predicted ``FFT_MARGIN`` (1.25x) faster than the better direct layout. The FFT wins at batch 1 from 28x28 maps
on and at batch 8 on 56x56 maps with 31x31 kernels or more; channels-last wins from 14x14 down to 7x7 maps,
where NCHW takes over again (at 13x13 kernels, under oneDNN's cliff).

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
_FORMAT = 4

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
    """What the cost model needs to know about one conv call (2-D, stride 1). `channels_last`: the layout the
    input comes in and the output must leave in (its neighbours' layout)."""

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    in_size: tuple[int, int]
    kernel: tuple[int, int]
    pads: Pads
    channels_last: bool = False

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

    @property
    def out_size(self) -> tuple[int, int]:
        return tuple(n + sum(p) - k + 1 for n, k, p in zip(self.in_size, self.kernel, self.pads, strict=True))

    def describe(self) -> str:
        kind = "depthwise" if self.depthwise else "dense"
        layout = ", channels-last" if self.channels_last else ""
        return (f"{kind} {'x'.join(map(str, self.kernel))} on {self.batch}x{self.in_channels}x"
                f"{'x'.join(map(str, self.in_size))}{layout}")


def taps_used(n: int, k: int, pads: tuple[int, int]) -> int:
    """On an `n`-long axis with (begin, end) zero `pads`: how many (output, tap) pairs read the input rather than
    padding. Tap m reads x[o + m - begin] for the outputs o in [0, n + begin + end - k]."""
    out = n + sum(pads) - k + 1
    return sum(max(0, min(out, n + pads[0] - m) - max(0, pads[0] - m)) for m in range(k))


CANDIDATES = ("nchw", "channels_last", "fft")
LABELS = {"nchw": "NCHW direct", "channels_last": "channels-last direct", "fft": "FFT"}


@dataclass(frozen=True)
class Decision:
    """The chosen candidate (one of `CANDIDATES`) and every candidate's predicted seconds (inf: not allowed)."""

    choice: str
    seconds: dict[str, float]
    reason: str

    @property
    def fft(self) -> bool:
        return self.choice == "fft"


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


_TABLES = ("dw_mac_s", "dw_cl_mac_s", "dense_mac_s", "fft_s")
_SCALARS = ("conv_t0_s", "fft_t0_s", "op_t0_s", "byte_s", "convert_s", "cmul_s", "cmac_s")


def check_constants(constants: Any) -> dict[str, Any]:
    """`constants` if they are a complete set of finite, non-negative numbers (tables keyed by positive ints),
    else ValueError: a cache entry written by another version, edited or corrupt is not trusted."""
    if not isinstance(constants, dict) or set(constants) != {*_TABLES, *_SCALARS}:
        raise ValueError(f"expected the keys {sorted({*_TABLES, *_SCALARS})}")
    for name in _SCALARS:
        value = constants[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"{name} = {value!r} is not a finite non-negative number")
    for name in _TABLES:
        table = constants[name]
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{name} is not a non-empty table")
        for k, v in table.items():
            if int(k) < 1 or isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise ValueError(f"{name}[{k!r}] = {v!r} is not a finite positive number")
    return constants


class CostModel:
    """Predicts the time of one conv call for each candidate, from measured `constants` (see the module
    docstring)."""

    def __init__(self, constants: dict[str, Any]):
        c = check_constants(constants)
        self.constants = c
        self.t0 = {kind: float(c[f"{kind}_t0_s"]) for kind in ("conv", "fft", "op")}
        self.byte_s = float(c["byte_s"])
        self.convert_s = float(c["convert_s"])
        self.cmul_s = float(c["cmul_s"])
        self.cmac_s = float(c["cmac_s"])
        self.mac_s = {name: {int(k): float(v) for k, v in c[f"{name}_mac_s"].items()}
                      for name in ("dw", "dw_cl", "dense")}
        self.fft_s = {int(k): float(v) for k, v in c["fft_s"].items()}  # by FFT length

    def _bytes(self, c: ConvShape) -> int:
        """Bytes of the input and output."""
        (h, w), (ho, wo) = c.in_size, c.out_size
        return 4 * c.batch * (c.in_channels * h * w + c.out_channels * ho * wo)

    def direct_seconds(self, c: ConvShape, channels_last: bool = False) -> float:
        """The direct conv in NCHW or channels-last layout, converting the input and output when the
        neighbours' layout (`c.channels_last`) is the other one."""
        (kh, kw), (ho, wo) = c.kernel, c.out_size
        table = "dense" if not c.depthwise else "dw_cl" if channels_last else "dw"
        if table == "dw_cl":  # oneDNN skips the taps that fall on padding
            taps = math.prod(taps_used(*axis) for axis in zip(c.in_size, c.kernel, c.pads, strict=True))
        else:
            taps = ho * wo * kh * kw
        macs = c.batch * c.out_channels * (c.in_channels // c.groups) * taps
        moved = self._bytes(c)
        convert = 0.0 if channels_last == c.channels_last else self._convert(c)
        return self.t0["conv"] + max(macs * _lookup(self.mac_s[table], max(kh, kw)), moved * self.byte_s) + convert

    def fft_seconds(self, c: ConvShape) -> float:
        p = fft_plan(c.in_size, c.kernel, c.pads)
        (n, m), (ho, wo) = p.size, p.out
        points, freqs = n * m, n * (m // 2 + 1)
        # forward: along W on the H input rows, along H on all columns; inverse: along H, then W on Ho rows
        forward = c.batch * c.in_channels * (0.5 + 0.5 * c.in_size[0] / n)
        inverse = c.batch * c.out_channels * (0.5 + 0.5 * ho / n)
        rate = (self._fft(n) + self._fft(m)) / 2
        transforms = (forward + inverse) * points * math.log2(max(points, 2)) * rate
        if c.groups == 1:
            mix = c.batch * c.out_channels * c.in_channels * freqs * self.cmac_s
        else:
            mix = c.batch * c.out_channels * freqs * self.cmul_s
        moved = 8 * c.batch * (c.in_channels + c.out_channels) * freqs + 8 * c.batch * c.out_channels * ho * wo
        strided = self._convert(c) if c.channels_last else 0.0  # transforms through channels-last strides
        return self.t0["fft"] + 4 * self.t0["op"] + transforms + mix + moved * self.byte_s + strided

    def _convert(self, c: ConvShape) -> float:
        """Converting the input and the output between NCHW and channels-last."""
        return 2 * self.t0["op"] + self._bytes(c) * self.convert_s

    def _fft(self, n: int) -> float:
        return _interp_log(self.fft_s, n)

    def seconds(self, c: ConvShape) -> dict[str, float]:
        """Predicted seconds of every candidate (the FFT: inf for kernels below MIN_FFT_KERNEL on both sides)."""
        fft = self.fft_seconds(c) if max(c.kernel) >= MIN_FFT_KERNEL else math.inf
        return {"nchw": self.direct_seconds(c, False), "channels_last": self.direct_seconds(c, True), "fft": fft}

    def choose(self, c: ConvShape, candidates: Sequence[str] = CANDIDATES) -> Decision:
        """Among `candidates`: the faster direct layout, or the FFT when predicted FFT_MARGIN times faster than it;
        never the FFT for kernels below MIN_FFT_KERNEL on both sides. Ties go to the layout of the neighbours.
        The decision keeps every candidate's predicted time, allowed or not."""
        times = self.seconds(c)
        order = [n for n in (("channels_last", "nchw") if c.channels_last else ("nchw", "channels_last"))
                 if n in candidates]
        direct = min(order, key=lambda name: times[name])
        fft = "fft" in candidates and times["fft"] * FFT_MARGIN < times[direct]
        choice = "fft" if fft else direct
        listed = ", ".join(f"{LABELS[n]} {times[n] * 1e3:.3g} ms" for n in CANDIDATES if times[n] < math.inf)
        reason = f"predicted {listed}"
        if max(c.kernel) < MIN_FFT_KERNEL:
            reason += f"; kernels below {MIN_FFT_KERNEL}x{MIN_FFT_KERNEL} never take the FFT"
        return Decision(choice, times, reason)


# --- calibration ---------------------------------------------------------------------------------------------
DW_KERNELS = (3, 5, 7, 9, 11, 13, 15, 17, 21, 25, 29, 33, 41, 51, 63)
DENSE_KERNELS = (3, 5, 7, 9, 13, 17, 21, 25, 33)
FFT_SIDES = tuple(n for n in range(8, 129) if fast_size(n) == n)


def calibrate(device: str = "cpu", rounds: int = 3, target_s: float = 3e-4, budget_s: float = 3.0
              ) -> dict[str, Any]:
    """Measure the cost model's constants on `device` with torch's current thread count (~1 s on an idle CPU).

    Each workload (a depthwise conv per kernel size in NCHW and in channels-last layout, a dense conv per kernel
    size, an FFT round trip per length, a complex product, a 4 MB copy, a 4 MB NCHW -> channels-last
    conversion) is grown by its batch until one call takes about `target_s`, then timed at that batch and at
    twice it: the rate is the slope (seconds per unit of work), the intercept the fixed cost of one call (about
    50 us for a oneDNN conv), of which each kind (conv, FFT) keeps the median. The fixed cost of any other op is
    the fastest call of a tiny one (the intercepts of the copy, conversion and product workloads carry their
    allocations' page faults: 70-130 us measured, against ~2 us for the call itself). Small workloads predict
    large ones (measured: a 512-plane 64x64 FFT runs at the per-point speed of a 16-plane one). All workloads are
    timed once per round and each keeps its fastest call over the rounds: a burst of load from other processes
    spoils one round, not one workload. On a loaded machine the rounds after the first stop once `budget_s` has passed.
    """
    import torch
    import torch.nn.functional as F

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last

    def randn(*shape: int, dtype=torch.float32):
        return torch.randn(*shape, generator=gen, dtype=dtype).to(dev)

    def once(fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    def conv(x, w, groups: int, layout=torch.contiguous_format):
        """Work: MACs, only those reading the input (not padding) in channels-last layout, like the model."""
        k, n = w.shape[-1], x.shape[-1]
        taps = taps_used(n, k, (k // 2, k // 2)) ** 2 if layout == cl else n * n * k * k
        macs = w.shape[0] * w.shape[1] * taps

        def make(batch: int):
            xb = x.expand(batch, -1, -1, -1).contiguous(memory_format=layout)
            return (lambda: F.conv2d(xb, w, padding=k // 2, groups=groups)), batch * macs
        return make

    def fft(n: int):
        def make(batch: int):
            x = randn(batch * max(4, 4096 // (n * n)), n, n)
            return (lambda: torch.fft.irfft2(torch.fft.rfft2(x), s=(n, n))), 2 * x.numel() * math.log2(n * n)
        return make

    def copy(batch: int):
        x = randn(batch, 1 << 20)
        return x.clone, 8 * x.numel()

    def convert(batch: int):
        x = randn(batch, 64, 64, 64)
        return (lambda: x.contiguous(memory_format=cl)), 8 * x.numel()

    def cmul(batch: int):
        a, b = randn(batch, 16, 32, 17, dtype=torch.complex64), randn(16, 32, 17, dtype=torch.complex64)
        return (lambda: a * b), a.numel()

    def cmac(batch: int):
        a, b = randn(batch, 32, 16, 17, dtype=torch.complex64), randn(32, 32, 16, 17, dtype=torch.complex64)
        return (lambda: torch.einsum("bihw,oihw->bohw", a, b)), batch * 32 * b.numel()

    # (name, key) -> (make(batch) -> (call, work), which fixed per-call cost it shares)
    workloads: dict[tuple[str, int], tuple[Callable[[int], Any], str]] = {}
    for k in DW_KERNELS:
        x, w = randn(1, 16, 16, 16), randn(16, 1, k, k)
        workloads[("dw_mac_s", k)] = (conv(x, w, 16), "conv")
        workloads[("dw_cl_mac_s", k)] = (conv(x, w, 16, cl), "conv")
    for k in DENSE_KERNELS:
        workloads[("dense_mac_s", k)] = (conv(randn(1, 16, 16, 16), randn(16, 16, k, k), 1), "conv")
    for n in FFT_SIDES:
        workloads[("fft_s", n)] = (fft(n), "fft")
    workloads[("cmul_s", 0)] = (cmul, None)
    workloads[("cmac_s", 0)] = (cmac, None)
    workloads[("byte_s", 0)] = (copy, None)
    workloads[("convert_s", 0)] = (convert, None)
    tiny = randn(16, dtype=torch.complex64)

    started = time.perf_counter()
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
        op_t0 = math.inf
        for i in range(rounds):
            if i and time.perf_counter() - started > budget_s:
                break
            for run, (fn, _) in runs.items():
                fastest[run] = min(fastest[run], once(fn))
            op_t0 = min(op_t0, *(once(lambda: tiny * tiny) for _ in range(20)))
    out: dict[str, Any] = {name: {} for name in _TABLES}
    fixed: dict[str, list[float]] = {"conv": [], "fft": []}
    for (name, k), (_, kind) in workloads.items():
        (t1, (_, w1)), (t2, (_, w2)) = ((fastest[((name, k), i)], runs[((name, k), i)]) for i in (0, 1))
        rate = min(max((t2 - t1) / (w2 - w1), 0.5 * t2 / w2), t2 / w2)  # slope, within noise bounds
        if kind is not None:
            fixed[kind].append(max(t1 - w1 * rate, 0.0))
        if name in out:
            out[name][k] = rate
        else:
            out[name] = rate
    for kind, values in fixed.items():
        out[f"{kind}_t0_s"] = statistics.median(values)
    out["op_t0_s"] = op_t0
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
    """The cost model of this machine for `device`: from the cache file, or calibrated now and saved there. A
    cache file that is not JSON, has another format, or holds an entry for this machine that fails
    `check_constants` is ignored, and the entry is measured again and rewritten (entries of other machines in a
    readable file are kept)."""
    key = machine_key(device)
    path = cache_dir() / CACHE_FILE
    if (str(path), key) in _loaded:
        return _loaded[(str(path), key)]
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = None
    machines = data.get("machines") if isinstance(data, dict) and data.get("format") == _FORMAT else None
    machines = machines if isinstance(machines, dict) else {}
    try:
        model = CostModel(machines[key])
    except (KeyError, TypeError, ValueError):
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
