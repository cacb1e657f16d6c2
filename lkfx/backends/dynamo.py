"""``torch.compile(model, backend="lkfx")``: lkfx's passes on ATen graphs, then inductor.

Registered through the ``torch_dynamo_backends`` entry point, so it works after ``pip install lkfx`` without
``import lkfx``. For each graph Dynamo captures (one per graph break)::

    Dynamo graph (parameters are graph inputs) ── make_fx(functionalize) on fake tensors ──► ATen graph
      inference: parameters and buffers that the graph does not write ──► constants (real values)
      ──► lkfx passes (pattern layer on aten.convolution / aten.native_batch_norm ...)
      ──► inductor ``compile_fx`` (it runs AOT autograd: the backward of the rewritten graph is derived from it)

Inference (no input requires grad, or grad mode is off, the rule AOT autograd uses) gets every pass asked for.
Default passes: ``fold_bn`` and ``fft_conv`` (``min_kernel=5``, ``mode='auto'``) on both devices, and on CUDA
also ``lower_dwconv`` (when registered: the Triton depthwise kernel). On the CPU inductor runs every conv
channels-last through oneDNN, whose depthwise convs have no large-kernel cliff, so ``fft_conv``'s cost model
prices the direct conv there as channels-last without conversions and rewrites a conv to the FFT only where
that is predicted 1.25x faster still (large maps with very large kernels, small batches: e.g. one thread,
batch 1, 31x31 on 128x56x56: channels-last 8 ms, FFT 3 ms; 27x27 on 512x14x14 stays direct: 0.9 against 1.8
ms). ``lower_dwconv``'s CPU path makes the same choice per call but hides the conv from inductor's layout
planning, so it is not a CPU default.
The graph is compiled with inductor's ``freezing`` on, since its parameters are constants already. Folding reads
parameter values, so the compiled graph watches them: when one of them is replaced or changed in place (its version
counter moves: ``load_state_dict``, an optimizer step, ``copy_``) the next call **recompiles** with the new values
(logged at INFO); the check costs about 0.1 us per frozen tensor and call. Writes through ``.data`` bypass version
counters and are not seen: call ``torch._dynamo.reset()`` after them.

Training keeps only the passes that are valid with gradients (``fft_conv``, ``lower_dwconv``): parameters stay
graph inputs, the FFT conv computes its kernel spectrum in the graph, and gradients are those of the same
function. Others asked for are skipped with a note.

Options: ``torch.compile(m, backend="lkfx", options={"passes": [...], **inductor_options})``: ``passes`` as for
`lkfx.transform` (names, ``(name, {option: value})`` tuples, Pass objects); every other key is an inductor
config option (``torch._inductor.config``), applied as in ``backend="inductor"``.

Graphs with dynamic shapes (symbolic sizes; Dynamo makes them after a second input shape) are compiled by inductor
without lkfx's passes, with a note: compile with ``dynamic=False`` to keep them. `last_report()` returns the
`lkfx.Report` of the last graph compiled; the logger ``lkfx.backends.dynamo`` logs each one at INFO.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from lkfx.errors import LkfxError, PassError
from lkfx.passes import Pass, PassContext, list_passes, resolve_passes
from lkfx.report import PassReport, Report

log = logging.getLogger(__name__)
aten = torch.ops.aten

TRAINING_PASSES = frozenset({"fft_conv", "lower_dwconv"})
_BN_OPS = (aten.native_batch_norm.default, aten._native_batch_norm_legit_no_training.default,
           aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default)
_last: list[Report] = []


def last_report() -> Report | None:
    """The report of the last graph this backend compiled (None before the first)."""
    return _last[-1] if _last else None


def default_passes(device: str) -> list[Any]:
    """The passes run when ``options`` names none (see the module docstring for why the CPU gets fewer)."""
    if device != "cuda":
        return ["fold_bn", ("fft_conv", {"min_kernel": 5})]
    lower = ["lower_dwconv"] if any(p["name"] == "lower_dwconv" for p in list_passes()) else []
    return ["fold_bn", *lower, ("fft_conv", {"min_kernel": 5})]


def lkfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None = None
                 ) -> Callable[..., Any]:
    """The ``torch.compile`` backend: see the module docstring."""
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    passes = options.pop("passes", None)
    _check_inductor_options(options)
    training = torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                               for t in example_inputs)
    if _dynamic(gm, example_inputs):
        report = Report("aten")
        report.notes.append("dynamic shapes: compiled by inductor without lkfx passes (use dynamic=False)")
        _publish(report, training)
        return compile_fx(gm, list(example_inputs), config_patches=options)
    if passes is None:
        passes = default_passes(_device(example_inputs))
    pass_objs = resolve_passes(passes)
    for p in pass_objs:
        if "fx" not in p.frontends():
            raise LkfxError(f"pass '{p.name}' has no torch.fx frontend, the backend cannot run it")
    if training:
        return _compile(gm, example_inputs, pass_objs, options, training=True)[0]
    return _FrozenGraph(gm, example_inputs, pass_objs, options)


class _FrozenGraph:
    """An inference graph compiled with its parameters as constants; recompiled when one of them changes."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], passes: list[Pass],
                 options: dict[str, Any]):
        self.gm, self.passes, self.options = gm, passes, options
        self._build(example_inputs)

    def _build(self, inputs: Sequence[Any]) -> None:
        self.fn, frozen = _compile(self.gm, inputs, self.passes, {"freezing": True, **self.options},
                                   training=False)
        self.keep = [i for i in range(len(inputs)) if i not in frozen]
        self.watch = [(i, inputs[i], inputs[i]._version) for i in frozen]

    def __call__(self, *args: Any) -> Any:
        for i, t, version in self.watch:
            a = args[i]
            if a is not t or a._version != version:
                log.info("lkfx: a parameter or buffer of a frozen graph changed; recompiling with the new values")
                self._build(args)
                break
        return self.fn(*[args[i] for i in self.keep])


def _compile(gm: fx.GraphModule, inputs: Sequence[Any], passes: list[Pass], options: dict[str, Any], *,
             training: bool) -> tuple[Callable[..., Any], list[int]]:
    """ATen graph, frozen inputs (inference), passes, inductor. Returns the compiled function and which input
    positions became constants (the function takes the others, in order)."""
    from torch._inductor.compile_fx import compile_fx

    graph = to_aten(gm, inputs)
    frozen = [] if training else freeze_inputs(graph, gm, inputs)
    report = Report("aten", before=aten_stats(graph))
    report.notes.append(f"{'training' if training else 'inference'} graph, {len(inputs)} inputs, "
                        f"{len(frozen)} frozen as constants")
    for p in passes:
        pr = PassReport(p.name, "aten")
        report.passes.append(pr)
        if training and p.name not in TRAINING_PASSES:
            pr.note(f"not applied in training (only {', '.join(sorted(TRAINING_PASSES))} keep gradients exact)")
            continue
        start = time.perf_counter()
        try:
            graph = p.run_fx(graph, PassContext(pr))
        except LkfxError:
            raise
        except Exception as e:
            raise PassError(f"pass '{p.name}' failed on an ATen graph: {type(e).__name__}: {e}") from e
        finally:
            pr.seconds += time.perf_counter() - start
    report.after = aten_stats(graph)
    _publish(report, training)
    kept = [t for i, t in enumerate(inputs) if i not in frozen]
    with torch._guards.tracing(None):  # a new graph, not Dynamo's: inductor sets up a tracing context of its own
        return compile_fx(graph, kept, config_patches=options), frozen


def to_aten(gm: fx.GraphModule, inputs: Sequence[Any]) -> fx.GraphModule:
    """The functional ATen graph of `gm`, traced on fake copies of `inputs` (static shapes): nothing runs for
    real, so BatchNorm running statistics are not touched. Input mutations end the graph as ``copy_`` nodes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch._guards.tracing(None):  # a fake mode of our own: Dynamo's shape environment must not see it
        return make_fx(torch.func.functionalize(gm, remove="mutations_and_views"), tracing_mode="fake")(*inputs)


def freeze_inputs(graph: fx.GraphModule, gm: fx.GraphModule, inputs: Sequence[Any]) -> list[int]:
    """Turn each input that Dynamo marked as a parameter or buffer, and that `graph` does not write, into a
    constant holding the very tensor (detached: its storage and version counter are shared, nothing is copied).
    Returns their positions."""
    placeholders = graph.graph.find_nodes(op="placeholder")
    static = [bool(n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type"))
              for n in gm.graph.find_nodes(op="placeholder")]
    frozen = []
    for i, (node, is_static, value) in enumerate(zip(placeholders, static, inputs, strict=True)):
        if not (is_static and isinstance(value, torch.Tensor)) or _written(node):
            continue
        name = f"lkfx_frozen_{i}"
        graph.register_buffer(name, value.detach())
        with graph.graph.inserting_before(node):
            attr = graph.graph.get_attr(name)
        attr.meta.update(node.meta)
        node.replace_all_uses_with(attr)
        graph.graph.erase_node(node)
        frozen.append(i)
    graph.recompile()
    return frozen


def _written(node: fx.Node) -> bool:
    """Whether an op writes into `node`'s tensor (``copy_`` of a functionalised input mutation, BatchNorm's
    running statistics in training mode)."""
    for user in node.users:
        schema = getattr(user.target, "_schema", None)
        if schema is None:
            continue
        for i, arg in enumerate(schema.arguments):
            value = user.args[i] if i < len(user.args) else user.kwargs.get(arg.name)
            if value is node and arg.alias_info is not None and arg.alias_info.is_write:
                return True
    return False


def aten_stats(graph: fx.GraphModule) -> dict[str, int]:
    nodes = [n for n in graph.graph.nodes if n.op == "call_function"]
    return {"convolutions": sum(n.target is aten.convolution.default for n in nodes),
            "batch_norms": sum(n.target in _BN_OPS for n in nodes)}


def _dynamic(gm: fx.GraphModule, inputs: Sequence[Any]) -> bool:
    if any(not isinstance(t, torch.Tensor) for t in inputs):
        return True  # SymInt sizes
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and any(not isinstance(d, int) for d in value.shape):
            return True
    return False


def _device(inputs: Sequence[Any]) -> str:
    return "cuda" if any(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs) else "cpu"


def _check_inductor_options(options: dict[str, Any]) -> None:
    import torch._inductor.config as inductor_config

    unknown = sorted(set(options) - set(inductor_config.get_config_copy()))
    if unknown:
        raise LkfxError(f"unknown option(s) {', '.join(map(repr, unknown))} for backend 'lkfx': give 'passes' and "
                        "torch._inductor.config options")


def _publish(report: Report, training: bool) -> None:
    _last[:] = [report]
    log.info("lkfx %s graph:\n%s", "training" if training else "inference", report)
