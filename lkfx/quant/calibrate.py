"""`calibrate`: run representative batches through a fake-quant torch model and set every activation range.

Each `FakeQuant` gets a fresh observer (its own method and options unless overridden), the model runs in eval mode
without gradients while the quantizers only observe, then each observer's statistics are reduced across processes
(when torch.distributed is initialised: min/max, summed histograms on a common grid) and its range is set. So
two processes with half of the data each get the ranges of one process with all of it (the histogram methods
and minmax exactly; ema averages the two).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn

from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import FakeQuant
from lkfx.quant.observers import make_observer


def _describe(batch: tuple[torch.Tensor, ...]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in batch)


def _batches(model: nn.Module, data: Any, num_batches: int, batch_size: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """The batches as tuples of positional inputs, checked for type, dtype, count and consistent shapes; with
    `batch_size` > 0 all samples, in order, re-cut into batches of that many (the last one may be smaller)."""
    if isinstance(data, (str, os.PathLike)):
        raise LkfxError(f"calibration data for a torch model is batches of tensors, not a path ({data}); load the "
                        "arrays first, e.g. [torch.from_numpy(a) for a in numpy.load(path).values()]")
    if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
        raise LkfxError("calibration data must be an iterable of batches (a list of input tensors, or of tuples of "
                        f"inputs for a model with several), got {type(data).__name__}")
    if not (isinstance(num_batches, int) and num_batches >= 0):
        raise LkfxError(f"num_batches must be an integer >= 0 (0 = all), got {num_batches!r}")
    if not (isinstance(batch_size, int) and batch_size >= 0):
        raise LkfxError(f"batch_size must be an integer >= 0 (0 = as given), got {batch_size!r}")
    batches = []
    for i, b in enumerate(data):
        if num_batches and i == num_batches and not batch_size:
            break
        b = tuple(b) if isinstance(b, (tuple, list)) else (b,)
        if not b or not all(isinstance(t, torch.Tensor) for t in b):
            raise LkfxError(f"calibration batch {i} is not a tensor or a tuple of tensors: {type(b[0]).__name__}"
                            if b else f"calibration batch {i} is empty")
        if not all(t.is_floating_point() for t in b):
            raise LkfxError(f"calibration batch {i} has non-float inputs ({_describe(b)}); give float tensors")
        if batches:
            first = batches[0]
            if len(b) != len(first) or any(t.shape[1:] != f.shape[1:] or t.dtype != f.dtype
                                           for t, f in zip(b, first, strict=True)):
                raise LkfxError(f"calibration batch {i} ({_describe(b)}) does not match batch 0 ({_describe(first)})")
        batches.append(b)
    if not batches:
        raise LkfxError("calibration data has no batches")
    if batch_size:
        whole = [torch.cat(ts) for ts in zip(*batches, strict=True)]
        batches = list(zip(*(t.split(batch_size) for t in whole), strict=True))
        batches = batches[:num_batches] if num_batches and len(batches) >= num_batches else batches
    if num_batches and len(batches) < num_batches:
        raise LkfxError(f"num_batches={num_batches} but the calibration data has only {len(batches)} batches")
    if isinstance(model, torch.fx.GraphModule):
        inputs = [n for n in model.graph.nodes if n.op == "placeholder" and not n.args]
        if len(batches[0]) != len(inputs):
            raise LkfxError(f"the model takes {len(inputs)} inputs, calibration batches have {len(batches[0])}")
        for t, node in zip(batches[0], inputs, strict=True):
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "shape") and tuple(meta.shape[1:]) != tuple(t.shape[1:]):
                raise LkfxError(f"input '{node.name}' has shape {tuple(meta.shape)}, calibration batches "
                                f"{tuple(t.shape)}: only the batch size may differ")
    return batches


def calibrate(model: nn.Module, data: Iterable[Any], *, method: str | None = None, num_batches: int = 0,
              batch_size: int = 0, **options: Any) -> nn.Module:
    """Set the range of every `FakeQuant` in `model` (in place) from `data`; returns `model`.

    `data`: batches, each the model's input tensor or a tuple of its inputs (from an ``(x, y)`` loader pass
    ``(x for x, _ in loader)``). `method` (one of `lkfx.quant.observers.METHODS`) and `options` (percentile,
    bins, search_start_scale, ...) override what the fake_quant pass chose. `num_batches`: 0 = all. `batch_size`
    > 0 re-cuts all the samples into batches of that size (then `num_batches` counts those). A quantizer whose
    search was overruled by the range guard (`lkfx.quant.observers.choose`) says so in its ``guard`` attribute.
    """
    from tqdm import tqdm

    quantizers = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuant)]
    if not quantizers:
        raise LkfxError("the model has no fake-quant modules; run lkfx.transform(model, ['fake_quant']) first")
    batches = _batches(model, data, num_batches, batch_size)
    observers = [make_observer(method or m.method, bits=m.bits, symmetric=m.symmetric, **{**m.options, **options})
                 for _, m in quantizers]
    was_training = model.training
    model.eval()
    try:
        for (_, m), obs in zip(quantizers, observers, strict=True):
            m.observer = obs
        with torch.no_grad():
            for i, b in enumerate(tqdm(batches, desc="calibrating", unit="batch", disable=None, leave=False)):
                try:
                    model(*b)
                except LkfxError:
                    raise
                except Exception as e:
                    if i:
                        raise
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise LkfxError(f"calibration batch 0 ({_describe(b)}) does not fit the model: {msg}") from e
    finally:
        for _, m in quantizers:
            m.observer = None
        model.train(was_training)
    ranges = []
    for (name, _), obs in zip(quantizers, observers, strict=True):
        try:
            obs.all_reduce()
            ranges.append(obs.range())
        except LkfxError as e:
            raise LkfxError(f"quantizer '{name}': {e} (the batches never reach it)") from e
    for (_, m), (lo, hi), obs in zip(quantizers, ranges, observers, strict=True):
        m.set_range(lo, hi)
        m.guard = getattr(obs, "guard", None)
    return model
