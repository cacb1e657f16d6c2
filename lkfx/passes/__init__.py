"""Registry of passes by name. Built-in passes live one per file in this package."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

from lkfx.errors import LkfxError
from lkfx.passes.base import Pass, PassContext

__all__ = ["Pass", "PassContext", "get_pass", "list_passes", "register_pass", "resolve_passes"]

BUILTIN = ("fake_quant", "fft_conv", "fold_bn", "kernel_warehouse", "lower_dwconv", "merge_reparam",
           "reparam_large_kernel")
_REGISTRY: dict[str, type[Pass]] = {}
_loaded = False


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available by its `name` to transform(), the CLI and list_passes()."""
    if not (isinstance(cls, type) and issubclass(cls, Pass)) or not cls.name:
        raise TypeError("register_pass expects a Pass subclass with a non-empty `name`")
    if not cls.frontends():
        raise TypeError(f"pass {cls.name!r} implements neither run_fx nor run_onnx")
    known = _REGISTRY.get(cls.name)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"a pass named {cls.name!r} is already registered ({known.__module__}.{known.__qualname__})")
    _REGISTRY[cls.name] = cls
    return cls


def _registry() -> dict[str, type[Pass]]:
    global _loaded
    if not _loaded:
        _loaded = True
        for name in BUILTIN:
            importlib.import_module(f"lkfx.passes.{name}")
    return _REGISTRY


def get_pass(name: str) -> type[Pass]:
    reg = _registry()
    if name not in reg:
        raise LkfxError(f"unknown pass '{name}'; valid passes: {', '.join(sorted(reg))}")
    return reg[name]


def _is_spec_tuple(item: Any) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict)


def resolve_passes(passes: Iterable[Any]) -> list[Pass]:
    """Turn names, (name, {options}) tuples and Pass objects into Pass objects."""
    if isinstance(passes, (str, Pass)) or _is_spec_tuple(passes):
        passes = [passes]
    out = []
    for item in passes:
        if isinstance(item, Pass):
            out.append(item)
        elif isinstance(item, str):
            out.append(get_pass(item)())
        elif _is_spec_tuple(item):
            out.append(get_pass(item[0])(**item[1]))
        else:
            raise LkfxError(f"cannot use {item!r} as a pass; give a name ('fold_bn'), a (name, {{options}}) tuple "
                            "or a Pass object")
    if not out:
        raise LkfxError(f"no passes given; valid passes: {', '.join(sorted(_registry()))}")
    return out


def list_passes() -> list[dict[str, Any]]:
    """Name, summary, frontends and options (with defaults) of every registered pass."""
    return [
        {"name": cls.name, "summary": cls.summary, "frontends": list(cls.frontends()), "exact": cls.exact,
         "options": dict(cls.options)}
        for _, cls in sorted(_registry().items())
    ]
