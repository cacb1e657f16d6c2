"""fold_bn: fold inference-mode BatchNorm into the neighbouring conv / linear.

BatchNorm at inference is ``s * y + t`` per channel, ``s = gamma / sqrt(var + eps)``, ``t = beta - mean * s``.

After a conv (Conv1d/2d/3d, ConvTranspose with any groups, Linear / Gemm, or a conv-like module whose output is
``conv(g(x), W, b)``: timm's Conv2dSame, see `lkfx.graph.fx.conv_like`)::

    x -> Conv(W, b) -> BN -> y        becomes        x -> Conv(s W, s b + t) -> y

Before a conv that does not zero-pad (padding 0, or reflect / replicate / circular padding, which pad with
copies of ``s x + t``)::

    x -> BN -> Conv(W, b) -> y        becomes        x -> Conv(W diag(s), b + W t) -> y

With zero padding the border taps would see 0 instead of ``t``: refused with that reason.

After a KernelWarehouse conv (`lkfx.modules.kernel_warehouse.KWConv`, whose kernels are assembled per sample
from cells shared with other layers) the BN becomes the conv's output affine map (`KWConv.fold_affine`)::

    x -> KWConv(b) -> BN -> y         becomes        x -> s KWConv(0) + (s b + t) -> y   (in place at inference)

A BN read by several convs folds into each of them when this is exact for every one (MobileNetV4's attention
norm feeding q, k, v).

Refused (each with its reason in the report): BN in training mode (torch ``.training``, ONNX
``training_mode=1``) or without running statistics; conv output also read elsewhere or a graph output (the
un-normalised value is still needed); weights computed in the graph; a Linear whose output rank is not proven
2-D (pass ``example_inputs``). A conv whose weight is shared with another node is folded into a copy (exact; the
report says so). The formulas live in `lkfx.kernel_math`; folding is done in float64 and cast back.

Every BatchNorm is accounted for: one no rule matched (no conv next to it), one inside a leaf module, and (in the
per-submodule fallback, `fx_subjects`) one inside a module torch.fx cannot trace is listed with its reason, and
each refusal names its BN (`Skip.node`): folded + distinct skipped == BatchNorms in the model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lkfx import kernel_math as km
from lkfx.passes import Pass, PassContext, register_pass
from lkfx.patterns.core import Pattern, Rule, apply_rules

BEFORE_OFF_REASON = "a conv reads it, and the option before=False leaves BatchNorms before a conv unfolded"
ZERO_PAD_REASON = "the conv zero-pads its input, so border taps would see 0 instead of the BatchNorm's shift"


@register_pass
class FoldBN(Pass):
    name = "fold_bn"
    summary = "Fold inference BatchNorm into the conv / linear before it (or after it, when exact)."
    options = {"before": True}

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from lkfx.modules.kernel_warehouse import KWConv

        return (KWConv,)

    def fx_subjects(self) -> tuple[type, ...]:
        import torch.nn as nn

        return (nn.modules.batchnorm._BatchNorm,)

    # --- torch.fx -----------------------------------------------------------------------------------
    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        import torch

        from lkfx.graph.fx import propagate_shapes
        from lkfx.patterns.fx import FxView, is_metadata_read

        if ctx.example_inputs is not None:
            propagate_shapes(gm, ctx.example_inputs)
        view = FxView(gm)
        refused: set[Any] = set()  # BN nodes a rule refused (listed in the report with the reason)

        def f64(t):
            return None if t is None else t.detach().to(torch.float64)

        def bn_affine(bn):
            return km.bn_scale_shift(f64(bn.mean), f64(bn.var), f64(bn.weight), f64(bn.bias), bn.eps)

        def common(conv, bn) -> str | None:
            reason = view.bn_refusal(bn)
            if reason:
                return reason
            if conv.weight is None:
                return "the conv weight is computed in the graph, not a parameter"
            if view.bias_is_computed(conv):
                return "the conv bias is computed in the graph, not a parameter"
            if not conv.weight.is_floating_point():
                return f"the conv weight is {conv.weight.dtype}, not floating point"
            return None

        def linear_rank(node) -> str | None:
            rank = view.rank(node)
            if rank is None:
                return "cannot prove the Linear's tensor is 2-D (BatchNorm1d on 3-D input normalises dim 1); " \
                       "pass example_inputs"
            return None if rank == 2 else f"the Linear's tensor is {rank}-D, BatchNorm normalises another dim"

        def after_check(m) -> str | None:
            if computed := view.computed_conv_args(m["conv"]):
                return f"the conv's {', '.join(computed)} are computed in the graph, not constants"
            conv, bn = view.conv(m["conv"]), view.bn(m["bn"])
            reason = common(conv, bn)
            if reason:
                return reason
            out_ch = conv.weight.shape[1] * conv.groups if conv.transposed else conv.weight.shape[0]
            return output_refusal(conv.node, bn, out_ch, conv.kind == "linear")

        def output_refusal(node, bn, out_ch: int, linear: bool) -> str | None:
            """Why the BN after conv `node` (`out_ch` outputs) cannot take its place there, or None."""
            others = view.users_besides(node, bn.node)
            if others:
                return f"the conv output is also used by {', '.join(others)}"
            if linear and (reason := linear_rank(node)):
                return reason
            if bn.mean.numel() != out_ch:
                return f"BatchNorm has {bn.mean.numel()} channels, the conv produces {out_ch}"
            return None

        def after_rewrite(m) -> str | None:
            conv, bn = view.conv(m["conv"]), view.bn(m["bn"])
            s, t = bn_affine(bn)
            w, b = km.fold_scale_after(f64(conv.weight), f64(conv.bias), s, t, transposed=conv.transposed,
                                       groups=conv.groups)
            shared = view.weight_shared_with(conv)
            view.set_params(conv, w, b, copy_module=shared is not None)
            bn.out.replace_all_uses_with(conv.node)
            _erase(gm, bn)
            return _shared_note(shared)

        def kw_check(m) -> str | None:
            kw, bn = view.gm.get_submodule(m["conv"].target), view.bn(m["bn"])
            if reason := view.bn_refusal(bn):
                return reason
            if (calls := view.module_calls(m["conv"])) > 1:
                return f"the KWConv module is called {calls} times: folding would change every call"
            return output_refusal(m["conv"], bn, kw.out_channels, not kw.kernel_size)

        def kw_rewrite(m) -> None:
            bn = view.bn(m["bn"])
            view.gm.get_submodule(m["conv"].target).fold_affine(*bn_affine(bn))
            bn.out.replace_all_uses_with(m["conv"])
            _erase(gm, bn)

        def readers(bn) -> list:
            return [u for u in bn.out.users if not is_metadata_read(u)]

        def reader_refusal(node, bn) -> str | None:
            """Why `bn` cannot fold into `node`, one of the nodes reading it, or None."""
            if view.kind(node) not in ("conv", "linear", "conv_like") or view.input_node(node, 0) is not bn.node:
                return "it is not a conv / linear reading the BatchNorm as its input"
            if computed := view.computed_conv_args(node):
                return f"the conv's {', '.join(computed)} are computed in the graph, not constants"
            conv = view.conv(node)
            reason = common(conv, bn)
            if reason:
                return reason
            if sum(a is bn.out for a in [*node.args, *node.kwargs.values()]) > 1:
                return "the conv reads the BatchNorm output more than once"
            if conv.own_forward:
                return f"the conv is a {type(conv.module).__name__}, whose own forward may pad its input " \
                       "(Conv2dSame pads with zeros at run time): border taps would not see the BatchNorm's shift"
            if conv.pads_with_zeros():
                return ZERO_PAD_REASON
            if conv.kind == "linear" and (reason := linear_rank(bn.out)):
                return reason
            in_ch = conv.weight.shape[1] * conv.groups
            if bn.mean.numel() != in_ch:
                return f"BatchNorm has {bn.mean.numel()} channels, the conv reads {in_ch}"
            return None

        def before_check(m) -> str | None:
            bn = view.bn(m["bn"])
            reason = reader_refusal(m["conv"], bn)
            if reason:
                return reason
            for other in readers(bn):  # a BN read by several convs folds into each when exact for all
                if other is m["conv"]:
                    continue
                if other.op == "output":
                    return "the BatchNorm output is also a graph output"
                if reason := reader_refusal(other, bn):
                    return f"the BatchNorm output is also used by {view.describe(other)}: {reason}"
            return None

        def before_rewrite(m) -> str | None:
            bn = view.bn(m["bn"])
            s, t = bn_affine(bn)
            notes = []
            for node in readers(bn):
                conv = view.conv(node)
                w, b = km.fold_scale_before(f64(conv.weight), f64(conv.bias), s, t, groups=conv.groups)
                shared = view.weight_shared_with(conv)
                view.set_params(conv, w, b, copy_module=shared is not None)
                node.update_arg(0, bn.node.args[0])
                if note := _shared_note(shared):
                    notes.append(note)
            bn.out.replace_all_uses_with(bn.node.args[0])  # metadata reads (x.shape): same shape
            _erase(gm, bn)
            return "; ".join(notes) or None

        def where(m) -> str:
            return f"{view.describe(m['conv'])} + {bn_name(m['bn'])}"

        def bn_name(node) -> str:
            """The BatchNorm module's name (functional calls: the module owning the running mean)."""
            if node.op == "call_module":
                return node.target
            mean = view.arg(node, "running_mean")
            if isinstance(mean, torch.fx.Node) and mean.op == "get_attr" and "." in mean.target:
                return mean.target.rpartition(".")[0]
            return node.name

        def refusing(check):
            def run(m) -> str | None:
                reason = check(m)
                if reason:
                    refused.add(m["bn"])
                return reason
            return run

        def subject(m) -> str:
            return bn_name(m["bn"])

        producers = ("conv", "conv_transpose", "linear", "conv_like")
        rules = [Rule("conv->bn", Pattern("batch_norm", [Pattern(producers, bind="conv")], bind="bn"),
                      refusing(after_check), after_rewrite, where, subject),
                 Rule("kw_conv->bn", Pattern("batch_norm", [Pattern("kw_conv", bind="conv")], bind="bn"),
                      refusing(kw_check), kw_rewrite, where, subject)]
        if self.config["before"]:
            rules.append(Rule("bn->conv", Pattern(("conv", "linear", "conv_like"), [Pattern("batch_norm", bind="bn")],
                                                  bind="conv"), refusing(before_check), before_rewrite, where, subject))
        apply_rules(view, rules, ctx.report)
        if ctx.report.modified:
            from lkfx.modules.kernel_warehouse import mark_interleaved

            mark_interleaved(gm)  # KW convs no longer separated by BatchNorms may chain batch-interleaved maps
        for node in gm.graph.nodes:  # every BatchNorm left is listed with its reason
            if view.kind(node) == "batch_norm" and node not in refused and \
                    (node.op == "call_module" or view.bn(node).mean is not None):
                ctx.report.matched += 1
                reason = BEFORE_OFF_REASON if not self.config["before"] and \
                    any(view.kind(u) in ("conv", "linear", "conv_like") for u in node.users) else \
                    _alone_fx(view, node, readers(view.bn(node)))
                ctx.report.skip(bn_name(node), reason, bn_name(node))
            elif node.op == "call_module" and view.kind(node) is None:
                for name, sub in view.gm.get_submodule(node.target).named_modules(prefix=node.target):
                    if isinstance(sub, self.fx_subjects()):
                        ctx.report.matched += 1
                        ctx.report.skip(name, f"inside {node.target}, a module torch.fx keeps whole (a leaf)", name)
        return view.finish() if ctx.report.modified else gm

    # --- ONNX ---------------------------------------------------------------------------------------
    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from lkfx.patterns.onnx import OnnxView, onnx_pads

        view = OnnxView(graph)
        prepared: dict[int, Any] = {}  # BN node id -> what its check computed, reused by the rewrite
        refused: set[int] = set()  # ids of BN nodes a rule refused (listed in the report with the reason)

        def f64(a):
            return None if a is None else np.asarray(a, dtype=np.float64)

        def bn_params(bn):
            """(s, t) or a refusal reason."""
            if int(bn.attrs.get("training_mode", 0)) == 1:
                return "BatchNormalization has training_mode=1 (it normalises with batch statistics)"
            if sum(1 for o in bn.outputs if o.name) > 1:
                return "BatchNormalization's running-statistics outputs are used"
            if int(bn.attrs.get("spatial", 1)) == 0:
                return "BatchNormalization with spatial=0 (per-activation statistics) is not per-channel"
            vals = [view.const(t) for t in bn.inputs[1:5]]
            if any(v is None for v in vals):
                return "BatchNormalization scale / bias / mean / var are not constants"
            gamma, beta, mean, var = map(f64, vals)
            if mean.ndim != 1:
                return f"BatchNormalization statistics have shape {mean.shape}, not one value per channel"
            return km.bn_scale_shift(mean, var, gamma, beta, float(bn.attrs.get("epsilon", 1e-5)))

        def weights(conv):
            """(W, b) as float64, or a refusal reason."""
            w = view.const(conv.inputs[1])
            bias_t = view.optional_input(conv, 2)
            b = view.const(bias_t) if bias_t is not None else None
            if w is None:
                return "the weight is not a constant"
            if bias_t is not None and b is None:
                return "the bias is not a constant"
            if not np.issubdtype(w.dtype, np.floating):
                return f"the weight is {w.dtype}, not floating point"
            return f64(w), f64(b), w.dtype

        def prepare(m):
            """(s, t, W, b, dtype) for a conv -> BN match, or a refusal reason."""
            conv, bn = m["conv"], m["bn"]
            others = view.users_besides(conv.outputs[0], bn)
            if others:
                return f"the {conv.op} output is also used by {', '.join(others)}"
            affine, params = bn_params(bn), weights(conv)
            for r in (affine, params):
                if isinstance(r, str):
                    return r
            return (*affine, *params)

        def after_check(m) -> str | None:
            data = prepared[id(m["bn"])] = prepare(m)
            if isinstance(data, str):
                return data
            conv, (s, _, w, _, _) = m["conv"], data
            if conv.op == "Gemm":
                if w.ndim != 2:
                    return "Gemm weight is not 2-D"
                out_ch = w.shape[0] if conv.attrs.get("transB", 0) else w.shape[1]
            elif conv.op == "ConvTranspose":
                out_ch = w.shape[1] * int(conv.attrs.get("group", 1))
            else:
                out_ch = w.shape[0]
            if s.shape[0] != out_ch:
                return f"BatchNormalization has {s.shape[0]} channels, the {conv.op} produces {out_ch}"
            return None

        def after_rewrite(m) -> str | None:
            conv, bn = m["conv"], m["bn"]
            s, t, w, b, dtype = prepared.pop(id(bn))
            if conv.op == "Gemm":
                w, b = _gemm_after(conv, w, b, s, t)
            else:
                w, b = km.fold_scale_after(w, b, s, t, transposed=conv.op == "ConvTranspose",
                                           groups=int(conv.attrs.get("group", 1)))
            shared = _set_weights(view, conv, w, b, dtype)
            view.bypass(bn, conv)
            return _shared_note("also read by " + ", ".join(shared) if shared else None)

        def reader_data(conv, bn_out, s):
            """(W, b, dtype) of `conv`, a node reading the BatchNorm's output `bn_out`, to fold into; or why not."""
            if conv.op not in ("Conv", "Gemm") or view.kind(conv) != conv.op or conv.inputs[0] is not bn_out \
                    or bn_out in conv.inputs[1:]:
                return "it is not a Conv / Gemm reading the BatchNormalization as its input"
            params = weights(conv)
            if isinstance(params, str):
                return params
            w = params[0]
            if conv.op == "Gemm":
                if int(conv.attrs.get("transA", 0)):
                    return "Gemm has transA=1: it reads the BatchNorm's channels as rows"
                in_ch = w.shape[1] if int(conv.attrs.get("transB", 0)) else w.shape[0]
            elif any(b or e for b, e in onnx_pads(conv, w.shape[2:])):
                return ZERO_PAD_REASON
            else:
                in_ch = w.shape[1] * int(conv.attrs.get("group", 1))
            if s.shape[0] != in_ch:
                return f"BatchNormalization has {s.shape[0]} channels, the {conv.op} reads {in_ch}"
            return params

        def before_check(m) -> str | None:
            conv, bn = m["conv"], m["bn"]
            out = bn.outputs[0]
            affine = bn_params(bn)
            if isinstance(affine, str):
                return affine
            own = reader_data(conv, out, affine[0])
            if isinstance(own, str):
                return own
            if out in view.graph.outputs:
                return "the BatchNormalization output is also a graph output"
            readers = {id(conv): (conv, own)}  # a BN read by several convs folds into each when exact for all
            for other in out.outputs:
                if id(other) not in readers:
                    data = reader_data(other, out, affine[0])
                    if isinstance(data, str):
                        return f"the BatchNormalization output is also used by {view.describe(other)}: {data}"
                    readers[id(other)] = (other, data)
            prepared[id(bn)] = (affine, list(readers.values()))
            return None

        def before_rewrite(m) -> str | None:
            bn = m["bn"]
            (s, t), readers = prepared.pop(id(bn))
            notes = []
            for conv, (w, b, dtype) in readers:
                if conv.op == "Gemm":
                    w, b = _gemm_before(conv, w, b, s, t)
                else:
                    w, b = km.fold_scale_before(w, b, s, t, groups=int(conv.attrs.get("group", 1)))
                shared = _set_weights(view, conv, w, b, dtype)
                if note := _shared_note("also read by " + ", ".join(shared) if shared else None):
                    notes.append(note)
            view.remove_passthrough(bn)
            return "; ".join(notes) or None

        def where(m) -> str:
            return f"{view.describe(m['conv'])} + {view.describe(m['bn'])}"

        def refusing(check):
            def run(m) -> str | None:
                reason = check(m)
                if reason:
                    refused.add(id(m["bn"]))
                return reason
            return run

        def subject(m) -> str:
            return view.describe(m["bn"])

        producer = Pattern(("Conv", "ConvTranspose", "Gemm"), bind="conv")
        rules = [Rule("conv->bn", Pattern("BatchNormalization", [producer], bind="bn"), refusing(after_check),
                      after_rewrite, where, subject)]
        if self.config["before"]:
            consumer = Pattern(("Conv", "Gemm"), [Pattern("BatchNormalization", bind="bn")], bind="conv")
            rules.append(Rule("bn->conv", consumer, refusing(before_check), before_rewrite, where, subject))
        apply_rules(view, rules, ctx.report)
        for bn in view.candidates(frozenset(["BatchNormalization"])):  # every one left is listed with its reason
            if view.alive(bn) and id(bn) not in refused:
                ctx.report.matched += 1
                reason = BEFORE_OFF_REASON if not self.config["before"] and \
                    any(n.op in ("Conv", "Gemm") for o in bn.outputs for n in o.outputs) else _alone_onnx(view, bn)
                ctx.report.skip(view.describe(bn), reason, view.describe(bn))
        if ctx.report.modified:
            view.finish()


def _alone_fx(view: Any, bn: Any, readers: list) -> str:
    """Why a BatchNorm no rule matched stays: what it reads and what reads it."""
    src = bn.args[0] if bn.args else None
    came = "a graph input" if getattr(src, "op", "") == "placeholder" else \
        f"{view.describe(src)}" if src is not None else "nothing"
    went = ", ".join("the graph output" if u.op == "output" else view.describe(u) for u in readers) or "nothing"
    return f"no conv / linear next to it: it reads {came}, and {went} reads it"


def _alone_onnx(view: Any, bn: Any) -> str:
    """Why a BatchNormalization no rule matched stays: what it reads and what reads it."""
    src = bn.inputs[0] if bn.inputs else None
    came = view.describe(src.inputs[0]) if src is not None and src.inputs else "a graph input"
    out = bn.outputs[0] if bn.outputs else None
    went = [view.describe(n) for n in out.outputs] if out is not None else []
    went += ["the graph output"] if out is not None and out in view.graph.outputs else []
    return f"no Conv / ConvTranspose / Gemm next to it: it reads {came}, and {', '.join(went) or 'nothing'} reads it"


def _shared_note(shared: str | None) -> str | None:
    return f"weight shared ({shared}); folded into a copy, the other users keep the original" if shared else None


def _erase(gm: Any, bn: Any) -> None:
    """Remove a folded BN: its output node, and for tuple-returning ATen ops the unused getitems too."""
    for user in list(bn.node.users):
        gm.graph.erase_node(user)
    if bn.node is not bn.out or not bn.node.users:
        gm.graph.erase_node(bn.node)


def _gemm_after(gemm: Any, w: np.ndarray, c: np.ndarray | None, s: np.ndarray, t: np.ndarray):
    """Y = alpha * A @ B + beta * C followed by s * Y + t  ->  Gemm(alpha=1, beta=1, B', C')."""
    alpha, beta = float(gemm.attrs.get("alpha", 1.0)), float(gemm.attrs.get("beta", 1.0))
    trans_b = int(gemm.attrs.get("transB", 0))
    w2 = alpha * w * (s[:, None] if trans_b else s[None, :])
    c2 = t if c is None else beta * c * s + t
    gemm.attrs["alpha"], gemm.attrs["beta"] = 1.0, 1.0
    return w2, c2


def _gemm_before(gemm: Any, w: np.ndarray, c: np.ndarray | None, s: np.ndarray, t: np.ndarray):
    """A = s * X + t (per column) feeding Y = alpha * A @ B + beta * C  ->  Gemm(alpha=1, beta=1, B', C')."""
    alpha, beta = float(gemm.attrs.get("alpha", 1.0)), float(gemm.attrs.get("beta", 1.0))
    trans_b = int(gemm.attrs.get("transB", 0))
    w_out_in = alpha * (w if trans_b else w.T)  # (N, K): the layout fold_scale_before expects
    w2, c2 = km.fold_scale_before(w_out_in, None if c is None else beta * c, s, t)
    gemm.attrs["alpha"], gemm.attrs["beta"] = 1.0, 1.0
    return (w2 if trans_b else w2.T), c2


def _set_weights(view: Any, conv: Any, w: np.ndarray, b: np.ndarray, dtype: np.dtype) -> list[str]:
    """Point `conv` at new weight and bias constants; return the other readers of its old weight."""
    shared = view.shared_with(conv.inputs[1], conv)
    view.replace_input(conv, 1, view.new_const(f"{conv.inputs[1].name}_bnfold", w.astype(dtype)))
    view.replace_input(conv, 2, view.new_const(f"{conv.outputs[0].name}_bias", b.astype(dtype)))
    return shared
