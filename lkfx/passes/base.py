"""The `Pass` base class: a name, a one-line summary, options with defaults, and one method per frontend."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lkfx.errors import LkfxError
from lkfx.report import PassReport

FRONTENDS = ("fx", "onnx")


@dataclass
class PassContext:
    """What a pass gets besides the graph: its report to fill, and the user's inputs if any."""

    report: PassReport
    example_inputs: Any = None
    calib_data: Any = None


class Pass:
    """Subclass, set `name`, `summary`, `options` (name -> default), implement `run_fx` and/or `run_onnx`,
    and decorate with `lkfx.register_pass`.

    `run_fx(gm, ctx)` returns the (possibly new) GraphModule; `run_onnx(graph, ctx)` edits the
    onnx-graphsurgeon graph in place. Both record matches, rewrites and refusals in `ctx.report`.
    `exact` passes promise outputs equal to the input model's within `tolerance` (max relative error).
    `module_fallback`: when a model cannot be traced as a whole, the pass may run on each traceable submodule.
    `uses_calib_data`: the pass reads `ctx.calib_data` (the CLI's --calib-data).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[dict[str, Any]] = {}
    exact: ClassVar[bool] = True
    tolerance: ClassVar[float] = 1e-5
    module_fallback: ClassVar[bool] = True
    uses_calib_data: ClassVar[bool] = False

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            valid = ", ".join(f"{k}={v!r}" for k, v in self.options.items()) or "none"
            raise LkfxError(f"pass '{self.name}' has no option {', '.join(map(repr, unknown))}; valid options: {valid}")
        for key, value in options.items():
            default = self.options[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise LkfxError(f"option '{key}' of pass '{self.name}' must be true or false, got {value!r}")
            numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
            if numeric and not isinstance(value, (int, float)):
                raise LkfxError(f"option '{key}' of pass '{self.name}' must be a number, got {value!r}")
        self.config: dict[str, Any] = {**self.options, **options}

    @classmethod
    def frontends(cls) -> tuple[str, ...]:
        return tuple(f for f in FRONTENDS if getattr(cls, f"run_{f}") is not getattr(Pass, f"run_{f}"))

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        """Module types of `model` that torch.fx must keep whole (one call_module node) for this pass."""
        return ()

    def fx_subjects(self) -> tuple[type, ...]:
        """Module types this pass accounts for (fold_bn: BatchNorms). In the per-submodule fallback, each one that
        no traced graph holds is listed as skipped, with the module torch.fx could not trace."""
        return ()

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        raise NotImplementedError

    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.config.items() if self.options.get(k) != v}
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
