"""`transform()`: dispatch on the model's kind, run the passes in order, optionally check the numerics.

    nn.Module  --deepcopy--> trace --> pass.run_fx ...   --> GraphModule   (check: torch, eval mode)
    ONNX file / ModelProto --> load --> graphsurgeon --> pass.run_onnx ... --> ModelProto (check: onnxruntime)
"""

from __future__ import annotations

import contextlib
import copy
import gc
import os
import sys
import time
from typing import Any

from lkfx.errors import CheckError, LkfxError, PassError
from lkfx.passes import Pass, PassContext, resolve_passes
from lkfx.report import PassReport, Report


def _is_module(model: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, os.PathLike)):
        return True
    onnx = sys.modules.get("onnx")
    return onnx is not None and isinstance(model, onnx.ModelProto)


def transform(
    model: Any,
    passes: Any,
    *,
    example_inputs: Any = None,
    inplace: bool = False,
    check: bool = False,
    return_report: bool = False,
    leaf_modules: Any = (),
    calib_data: Any = None,
) -> Any:
    """Apply `passes` to `model` (an nn.Module, an onnx.ModelProto or a path to a .onnx file).

    passes: names (``"fold_bn"``), ``(name, {option: value})`` tuples or Pass objects, run in order.
    example_inputs: a tensor / tuple of tensors (modules); for ONNX a ``{name: array}`` dict, or arrays / tensors
        for the graph inputs in order. Used by passes that need shapes and by the check. check=True on a module
        requires them; ONNX gets random inputs otherwise.
    inplace: False never touches the caller's model; True lets passes mutate it.
    check: compare outputs of the original and the result and raise `CheckError` beyond the passes' tolerance.
    leaf_modules: module types torch.fx should not trace into.
    Returns the rewritten model, or ``(model, report)`` with return_report=True.
    """
    pass_objs = resolve_passes(passes)
    if _is_module(model):
        out, report = _transform_module(model, pass_objs, example_inputs, inplace, check, tuple(leaf_modules),
                                        calib_data)
    elif _is_onnx(model):
        with _gc_paused():
            out, report = _transform_onnx(model, pass_objs, example_inputs, inplace, check, calib_data)
    else:
        raise LkfxError(f"cannot transform a {type(model).__name__}; give a torch.nn.Module, an onnx.ModelProto "
                        "or the path of a .onnx file")
    return (out, report) if return_report else out


def _pass_report(report: Report, p: Pass) -> PassReport:
    for pr in report.passes:
        if pr.name == p.name:
            return pr
    pr = PassReport(p.name, report.frontend)
    report.passes.append(pr)
    return pr


def _run(p: Pass, fn, graph, ctx: PassContext, where: str):
    start = time.perf_counter()
    try:
        return fn(graph, ctx)
    except LkfxError:
        raise
    except ModuleNotFoundError as e:  # an optional dependency this pass needs is not installed: not a bug
        package = (e.name or "").split(".")[0]
        if not package or package == "lkfx":
            raise PassError(f"pass '{p.name}' failed on {where}: {type(e).__name__}: {e}") from e
        extra = _EXTRAS.get(package)
        how = f"pip install 'lkfx[{extra}]'" if extra else f"install '{package}'"
        raise LkfxError(f"pass '{p.name}' needs the Python package '{package}', which is not installed: {how}") from e
    except Exception as e:
        raise PassError(f"pass '{p.name}' failed on {where}: {type(e).__name__}: {e}") from e
    finally:
        ctx.report.seconds += time.perf_counter() - start


_EXTRAS = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnx", "onnx_graphsurgeon": "onnx", "triton": "triton",
           "tensorrt": "tensorrt"}  # top-level package -> the extra of pyproject.toml that installs it


def _require(passes: list[Pass], frontend: str) -> None:
    for p in passes:
        if frontend not in p.frontends():
            raise LkfxError(f"pass '{p.name}' has no {frontend} frontend (it works on: {', '.join(p.frontends())})")


def _tolerance(passes: list[Pass]) -> float:
    return max(p.tolerance for p in passes)


# --- torch.fx ---------------------------------------------------------------------------------------------
def _transform_module(model, passes, example_inputs, inplace, check, leaf_modules, calib_data):
    import torch

    from lkfx.graph import fx as gfx

    _require(passes, "fx")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif example_inputs is not None:
        example_inputs = tuple(example_inputs)
    if check and example_inputs is None:
        raise LkfxError("check=True on an nn.Module needs example_inputs=(tensor, ...) to run both models")
    reference = copy.deepcopy(model) if (check and inplace) else model
    work = model if inplace else copy.deepcopy(model)
    leaf_modules = (*leaf_modules, *(t for p in passes for t in p.fx_leaf_modules(work)))
    report = Report("fx", before=gfx.stats(model))

    def run_all(gm, inputs, where):
        for p in passes:
            ctx = PassContext(_pass_report(report, p), inputs, calib_data)
            gm = _run(p, p.run_fx, gm, ctx, where)
        return gm

    try:
        gm = gfx.trace(work, leaf_modules)
    except gfx.TraceError as e:
        if not all(p.module_fallback for p in passes):
            raise
        report.notes.append(f"{e}; rewrote each traceable submodule instead")
        inputs = gfx.submodule_inputs(work, example_inputs) if example_inputs is not None else {}
        hidden = f"inside {type(model).__name__}, which torch.fx cannot trace ({e.detail})"
        _rewrite_children(work, "", run_all, inputs, leaf_modules, report, passes, hidden)
        result = work
    else:
        _skip_uncalled(work, gm, passes, report)
        result = run_all(gm, example_inputs, type(model).__name__)
        result.training = work.training
    report.after = gfx.stats(result)
    if check:
        _check_module(reference, result, example_inputs, _tolerance(passes), report)
    return result, report


def _rewrite_children(module, prefix, run_all, inputs, leaf_modules, report, passes, hidden) -> None:
    """Rewrite each child of `module` that torch.fx can trace; recurse into those it cannot. `hidden` says why the
    modules no traced graph holds are not seen: each one a pass accounts for (`Pass.fx_subjects`) is listed as
    skipped with it. Skips from a child's graph are prefixed with the child's name."""
    from lkfx.graph import fx as gfx

    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if not list(child.children()) or any(isinstance(child, p.fx_subjects()) for p in passes):
            _skip_hidden(child, full, passes, report, hidden)
            continue  # a single layer: nothing to pair it with at this level
        try:
            gm = gfx.trace(child, leaf_modules)
        except gfx.TraceError as e:
            report.notes.append(f"{full}: {e}")
            _rewrite_children(child, f"{full}.", run_all, inputs, leaf_modules, report, passes,
                              f"inside {full}, which torch.fx cannot trace ({e.detail})")
            continue
        before = sum(p.rewritten for p in report.passes)
        seen = {id(pr): len(pr.skipped) for pr in report.passes}
        new = run_all(gm, inputs.get(full), full)
        for pr in report.passes:
            for s in pr.skipped[seen.get(id(pr), 0):]:
                s.where, s.node = f"{full}: {s.where}", s.node and f"{full}.{s.node}"
        if sum(p.rewritten for p in report.passes) > before:
            new.training = child.training
            _keep_attributes(child, new)
            setattr(module, name, new)


def _skip_uncalled(model, gm, passes, report) -> None:
    """List the modules a pass accounts for (`Pass.fx_subjects`) that the traced forward never reaches: neither
    called nor read (torchvision's GoogLeNet runs its auxiliary heads in training only)."""
    used = {n.target for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for p in passes:
        for name, m in model.named_modules():
            if isinstance(m, p.fx_subjects()) and not any(
                    u == name or u.startswith(f"{name}.") or name.startswith(f"{u}.") for u in used):
                pr = _pass_report(report, p)
                pr.matched += 1
                pr.skip(name, "the traced forward does not use it (a branch not taken, e.g. a head used in "
                              "training only)", node=name)


def _skip_hidden(module, path, passes, report, why) -> None:
    for p in passes:
        for name, m in module.named_modules(prefix=path):
            if isinstance(m, p.fx_subjects()):
                pr = _pass_report(report, p)
                pr.matched += 1
                pr.skip(name, why, node=name)


def _keep_attributes(old, new) -> None:
    """The parent's forward, which is not traced, may read plain attributes of the child it calls (timm's
    EfficientVit reads ``self.attn.resolution``): give them to the GraphModule that replaces the child, listed
    where GraphModule.__deepcopy__ restores them from."""
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    keep = {k: v for k, v in vars(old).items() if not k.startswith("_") and not hasattr(new, k)}
    new.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {}).update(keep)
    for key, value in keep.items():
        setattr(new, key, value)


def _check_module(reference, result, example_inputs, tol, report) -> None:
    import torch

    from lkfx.graph import fx as gfx

    def outputs(m, inputs, float64=False):
        m = copy.deepcopy(m).eval()
        with torch.no_grad():
            return gfx.flat_outputs((m.double() if float64 else m)(*inputs))

    def float64(m):
        inputs = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                       for x in example_inputs)
        try:
            return outputs(m, inputs, float64=True), None
        except Exception as e:  # an op without a float64 kernel, a dtype fixed in the forward, ...
            return None, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"

    ref, out = outputs(reference, example_inputs), outputs(result, example_inputs)
    _judge(ref, out, tol, lambda: float64(reference), lambda: float64(result), report, "outputs differ",
           [p.name for p in report.passes])


def _judge(ref, out, tol, original64, rewritten64, report, what, names) -> None:
    """Pass when the rewritten model's outputs `out` are within `tol` of the original's `ref` (max relative error).

    Otherwise tell float32 rounding from a wrong rewrite with float64 runs (`original64()` / `rewritten64()` return
    (outputs, None), or (None, why not)). Rounding in a deep network can move the float32 outputs by more than `tol`
    between two exact programs, and by different amounts in each: on one EfficientNetV2 (efficientnetv2_rw_t, batch 1,
    64 x 64, onnxruntime on one thread) the original is 4.2e-4 from its float64 run and the correctly folded model
    3.2e-3. Run in float64, an exact rewrite differs from the original only by its weights having been rounded to
    float32 once, a smaller perturbation than the original's own float32 run, which rounds every activation and every
    partial sum too (the folded model in float64: 1.8e-4 there). So the rule:

        ``err(original64, rewritten64) <= err(original64, original32) + tol``

    (one BN shift corrupted by 0.5 on the same model: 0.55). Where only the original runs in float64, the float32
    rewritten model must be at most twice as far from it as the original, plus `tol`; where neither runs, the float32
    rule stands. The report says which rule judged.

    Within `tol` in float32 passes at once: the float64 runs are made only when the float32 outputs differ.
    """
    from lkfx.compare import max_rel_error

    err = max_rel_error(ref, out)
    report.check = check = {"max_rel_error": err, "tolerance": tol, "passed": err <= tol}
    if err <= tol:
        return
    ref64, why = original64()
    if ref64 is None:
        check["note"] = f"no float64 run of the original ({why}); judged against the original in float32"
        raise CheckError(f"{what} after {names}: max relative error {err:.3g} > tolerance {tol:g} "
                         f"({check['note']})")
    original, rewritten = max_rel_error(ref64, ref), max_rel_error(ref64, out)
    check.update(reference="float64", original_error=original, rewritten_error=rewritten)
    out64, why = rewritten64()
    if out64 is not None:
        d64 = max_rel_error(ref64, out64)
        check.update(rewritten_float64_error=d64, passed=d64 <= original + tol)
        if not check["passed"]:
            raise CheckError(f"{what} after {names}: run in float64, the rewritten model is {d64:.3g} from a float64 "
                             f"run of the original, the original itself {original:.3g} from it in float32: more "
                             f"than float32 rounding explains, plus the tolerance {tol:g} (max relative error "
                             f"between the float32 runs {err:.3g})")
        return
    check.update(note=f"no float64 run of the rewritten model ({why}); judged by its float32 run: at most twice as "
                      "far from the float64 original as the original, plus the tolerance",
                 passed=rewritten <= 2 * original + tol)
    if not check["passed"]:
        raise CheckError(f"{what} after {names}: the rewritten model is {rewritten:.3g} from a float64 run of the "
                         f"original, the original itself {original:.3g}: more than twice as far, plus the tolerance "
                         f"{tol:g} (max relative error between them {err:.3g}; {check['note']})")


# --- ONNX -------------------------------------------------------------------------------------------------
def _transform_onnx(source, passes, example_inputs, inplace, check, calib_data):
    import onnx

    from lkfx.graph import onnx as gonnx

    _require(passes, "onnx")
    model = gonnx.load(source)
    report = Report("onnx", before=gonnx.stats(model))
    graph = gonnx.to_graph(model)
    if example_inputs is not None:
        example_inputs = gonnx.as_feeds(model, example_inputs)
    feeds = example_inputs
    if check and feeds is None and calib_data is not None and any(p.uses_calib_data for p in passes):
        from lkfx.quant.data import input_spec, load_calib_data

        # approximate passes are checked on their first calibration batch: random inputs leave calibrated ranges
        calib_data = load_calib_data(calib_data, input_spec(graph))
        feeds = calib_data[0]
    for p in passes:
        ctx = PassContext(_pass_report(report, p), example_inputs, calib_data)
        _run(p, p.run_onnx, graph, ctx, "the ONNX graph")
    out = gonnx.from_graph(graph, model)
    del graph
    if out.ByteSize() <= 2**31 - 1:
        try:
            onnx.checker.check_model(out)
        except onnx.checker.ValidationError as e:
            raise PassError(f"passes {[p.name for p in passes]} produced an invalid model (a bug in lkfx): {e}") from e
    report.after = gonnx.stats(out)
    if check:
        feeds = feeds if feeds is not None else gonnx.random_inputs(model)
        ref, got = _run_onnx_pair(model, out, feeds)
        _judge(ref, got, _tolerance(passes) * gonnx.precision_ratio(model), lambda: gonnx.run_float64(model, feeds),
               lambda: gonnx.run_float64(out, feeds), report, "onnxruntime outputs differ", [p.name for p in passes])
    if inplace and isinstance(source, onnx.ModelProto):
        source.CopyFrom(out)
        out = source
    return out, report


@contextlib.contextmanager
def _gc_paused():
    """The graphsurgeon graph is ~10 Python objects per node; cyclic GC passes over them while it is built make
    large graphs super-linear (5000-block chain, load to save: 2.0 s with GC, 1.7 s paused; 500 blocks: same).
    Python collects later, as usual, once the call has returned."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _run_onnx_pair(model, out, feeds) -> tuple[list, list]:
    """The input model must run in onnxruntime for a check (bad input otherwise); the result must too (a bug)."""
    from lkfx.graph import onnx as gonnx

    try:
        ref = gonnx.run(model, feeds)
    except LkfxError:
        raise
    except Exception as e:  # onnxruntime's errors are plain Exceptions: unknown ops, missing kernels, bad shapes
        shapes = {k: list(getattr(v, "shape", ())) for k, v in feeds.items()}
        raise LkfxError(f"onnxruntime cannot run the input model on inputs of shapes {shapes}, so it cannot be "
                        f"checked: {gonnx.one_line(e)}; fix the model (or its input shapes) or drop the check") from e
    try:
        got = gonnx.run(out, feeds)
    except Exception as e:
        raise PassError(f"onnxruntime cannot run the rewritten model (a bug in lkfx): {gonnx.one_line(e)}") from e
    return ref, got
