"""Calibration data: load it and check it against the model's inputs before any work is done.

Accepted forms (``inputs`` is the model's ``{name: (shape, dtype)}``, ``None`` for a free dimension):

- a path to a ``.npz`` file or to a folder of ``.npy`` files. Arrays named after the model's inputs (npz keys,
  file stems) hold those inputs, samples along dim 0. For a single-input model the names may be anything
  (``np.savez(path, x0, x1)``): each array is then one batch, in name order (``arr_2`` before ``arr_10``).
- in Python: a ``{name: array}`` dict; one array (single-input models); or an iterable of batches, each an
  array, a ``{name: array}`` dict or a tuple of arrays in input order. Torch tensors are accepted too.

Each block of samples given is one batch, as given, when the model's batch dimension (dim 0) is free; when every
input fixes it to the same B, a block is cut into batches of B samples. With ``batch_size`` > 0 (fake_quant's
``batch_size`` option, ``lkfx optimize --calib-batch-size N``) the batches no longer depend on how the data is laid
out or named: all samples, in order, are cut into batches of ``batch_size`` (the last one may be smaller; a model
whose batch dimension is fixed needs that size). Every array must have the input's dtype,
rank and fixed dimensions and finite values (and, to be cut, as many samples as the other inputs of its block).
``num_batches`` > 0 takes the first that many batches and fails if there are fewer; a generator is read no further
than that. Pickled arrays are never loaded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from lkfx.errors import LkfxError

InputSpec = Mapping[str, tuple[tuple[int | None, ...], np.dtype]]
Batch = dict[str, np.ndarray]


def load_calib_data(source: Any, inputs: InputSpec, *, num_batches: int = 0, batch_size: int = 0) -> list[Batch]:
    """The calibration batches in `source`, validated against `inputs` (see the module docstring)."""
    if source is None:
        raise LkfxError("fake_quant needs calibration data: pass calib_data= to lkfx.transform or --calib-data PATH "
                        "(a .npz file or a folder of .npy files holding input batches)")
    for key, value in (("num_batches", num_batches), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise LkfxError(f"{key} must be an integer >= 0 (0 = {'all' if key == 'num_batches' else 'as given'}), "
                            f"got {value!r}")
    names = list(inputs)
    batches: list[Batch] = []
    if batch_size:
        blocks = [_check_block(block, inputs) for block in _blocks(source, names)]
        if blocks:
            whole = {n: np.concatenate([b[n] for b in blocks]) for n in names}
            batches = _split(whole, inputs, batch_size)
        return _take(batches, num_batches, source)
    for block in _blocks(source, names):
        batches += _split(_check_block(block, inputs), inputs)
        if num_batches and len(batches) >= num_batches:
            return batches[:num_batches]
    return _take(batches, num_batches, source)


def _take(batches: list[Batch], num_batches: int, source: Any) -> list[Batch]:
    if not batches:
        raise LkfxError(f"calibration data {_describe(source)} holds no batches")
    if num_batches > len(batches):
        raise LkfxError(f"calibration data {_describe(source)} holds {len(batches)} batches, fewer than "
                        f"num_batches={num_batches}; give more data or a smaller num_batches (0 = all)")
    return batches[:num_batches] if num_batches else batches


def input_spec(graph: Any) -> dict[str, tuple[tuple[int | None, ...], np.dtype]]:
    """An onnx-graphsurgeon graph's inputs as ``{name: (shape, dtype)}``, ``None`` for symbolic or unknown dims."""
    spec = {}
    for inp in graph.inputs:
        if inp.shape is None or inp.dtype is None:
            raise LkfxError(f"model input '{inp.name}' has no declared shape or type; cannot check calibration data "
                            "against it (set its shape in the model)")
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in inp.shape)
        spec[inp.name] = (shape, np.dtype(inp.dtype))
    return spec


def _describe(source: Any) -> str:
    return f"'{source}'" if isinstance(source, (str, Path)) else f"({type(source).__name__})"


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _blocks(source: Any, names: list[str]) -> Iterable[dict[str, Any]]:
    """Blocks of samples as {input name: array-like}."""
    if isinstance(source, (str, Path)):
        return _named_or_batches(_read_path(Path(source)), names, f"'{source}'")
    if isinstance(source, Mapping):
        return [_named(dict(source), names, "the calibration dict")]
    if hasattr(source, "shape"):  # one array or tensor: samples of a single-input model
        return [_single(source, names)]
    if isinstance(source, Iterable):
        return (_batch_item(item, names, i) for i, item in enumerate(source))
    raise LkfxError(f"cannot read calibration data from a {type(source).__name__}; give a .npz path, a folder of "
                    ".npy files, a {name: array} dict, an array, or an iterable of batches")


def _read_path(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise LkfxError(f"calibration data '{path}' does not exist")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"), key=lambda p: _natural(p.name))
            if not files:
                raise LkfxError(f"calibration folder '{path}' has no .npy files")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in sorted(z.files, key=_natural)}
    except (OSError, ValueError, EOFError) as e:
        raise LkfxError(f"cannot read calibration data '{path}': {e}") from e
    raise LkfxError(f"calibration data '{path}' is neither a .npz file nor a folder of .npy files")


def _named_or_batches(arrays: dict[str, np.ndarray], names: list[str], where: str) -> list[dict[str, Any]]:
    if set(arrays) & set(names) or len(names) > 1:
        return [_named(arrays, names, where)]
    return [{names[0]: a} for a in arrays.values()]  # single input, arbitrary names: one batch per array


def _named(arrays: dict[str, Any], names: list[str], where: str) -> dict[str, Any]:
    if len(names) == 1 and len(arrays) == 1:
        return {names[0]: next(iter(arrays.values()))}
    missing, extra = [n for n in names if n not in arrays], sorted(set(arrays) - set(names))
    if missing or extra:
        problems = ([f"missing {', '.join(map(repr, missing))}"] if missing else []) + \
                   ([f"unknown {', '.join(map(repr, extra))}"] if extra else [])
        raise LkfxError(f"calibration data {where}: {'; '.join(problems)}; the model's inputs are "
                        f"{', '.join(map(repr, names))}")
    return {n: arrays[n] for n in names}


def _single(array: Any, names: list[str]) -> dict[str, Any]:
    if len(names) != 1:
        raise LkfxError(f"the model has {len(names)} inputs ({', '.join(map(repr, names))}); give calibration data "
                        "as a {name: array} dict or batches of dicts, not a single array")
    return {names[0]: array}


def _batch_item(item: Any, names: list[str], index: int) -> dict[str, Any]:
    if isinstance(item, Mapping):
        return _named(dict(item), names, f"batch {index}")
    if hasattr(item, "shape"):
        return _single(item, names)
    if isinstance(item, (tuple, list)):
        if len(item) != len(names):
            raise LkfxError(f"calibration batch {index} has {len(item)} arrays, the model has {len(names)} inputs "
                            f"({', '.join(map(repr, names))}); for a loader of (inputs, labels) pass "
                            "(x for x, _ in loader)")
        return dict(zip(names, item, strict=True))
    raise LkfxError(f"calibration batch {index} is a {type(item).__name__}; give an array, a {{name: array}} dict "
                    "or a tuple of arrays in input order")


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _check_block(block: dict[str, Any], inputs: InputSpec) -> Batch:
    out = {}
    for name, (shape, dtype) in inputs.items():
        a = _as_numpy(block[name])
        if a.dtype != dtype:
            raise LkfxError(f"calibration input '{name}' is {a.dtype}, the model expects {np.dtype(dtype)}; "
                            f"convert it with .astype(np.{np.dtype(dtype)})")
        if a.ndim != len(shape):
            raise LkfxError(f"calibration input '{name}' has shape {a.shape}, the model expects rank {len(shape)} "
                            f"({_shape(shape)})")
        bad = [i for i, (d, m) in enumerate(zip(a.shape, shape, strict=True)) if i > 0 and m is not None and d != m]
        if bad:
            raise LkfxError(f"calibration input '{name}' has shape {a.shape}, the model expects {_shape(shape)} "
                            f"(dimension {bad[0]} differs; the batch dimension 0 is free)")
        if a.size == 0:
            raise LkfxError(f"calibration input '{name}' is empty (shape {a.shape})")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise LkfxError(f"calibration input '{name}' contains NaN or infinite values")
        out[name] = a
    return out


def _shape(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _split(block: Batch, inputs: InputSpec, batch_size: int = 0) -> list[Batch]:
    """Cut a block into batches of `batch_size` samples (the last one may be smaller), or, without it, of the
    model's batch size B when every input fixes dim 0 to the same B; otherwise the block is one batch."""
    fixed = {shape[0] if shape else None for shape, _ in inputs.values()}
    if batch_size:
        if fixed - {None, batch_size}:
            raise LkfxError(f"batch_size={batch_size} but the model's batch dimension is fixed at "
                            f"{', '.join(str(f) for f in fixed if f is not None)}; use that batch size")
        n = next(iter(block.values())).shape[0]
        if any(a.shape[0] != n for a in block.values()):
            raise LkfxError(f"calibration inputs have different numbers of samples: "
                            f"{ {k: a.shape[0] for k, a in block.items()} }")
        return [{k: a[i:i + batch_size] for k, a in block.items()} for i in range(0, n, batch_size)]
    if len(fixed) != 1 or None in fixed:
        return [block]
    size = fixed.pop()
    samples = {k: a.shape[0] for k, a in block.items()}
    if len(set(samples.values())) > 1:
        raise LkfxError(f"calibration inputs have different numbers of samples: {samples}")
    n = next(iter(samples.values()))
    if n % size:
        raise LkfxError(f"calibration data has a block of {n} samples but the model's batch dimension is fixed at "
                        f"{size}; give a multiple of {size} samples")
    return [{k: a[i:i + size] for k, a in block.items()} for i in range(0, n, size)]
