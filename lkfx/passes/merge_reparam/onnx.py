"""merge_reparam on ONNX: the generic rule over ``Add`` / ``Sum`` / ``Sub`` / ``Neg`` / ``Mul``-by-constant
expressions of ``Conv`` (+ ``BatchNormalization``), BN-only and identity branches (see the package docstring).

The merged ``Conv`` reads the shared input and writes the expression's output tensor (or the output of the
inference BN that alone followed it); the old branch nodes are left unread and removed by the cleanup.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from lkfx import kernel_math as km
from lkfx.patterns.onnx import OnnxView, auto_pad, onnx_pads
from lkfx.report import PassReport

from .core import Branch, Merged, Term, combine, group_terms, merge, merged_note

_MINUS = np.asarray(-1.0)
NEGATE = "negate"


def _default(node: gs.Node) -> bool:
    return node.domain in (None, "", "ai.onnx")


class _Rule:
    def __init__(self, graph: gs.Graph, report: PassReport):
        self.graph, self.report = graph, report
        self.view = OnnxView(graph)
        self.changed = False

    # reading -------------------------------------------------------------------------------------------
    def producer(self, t: gs.Tensor, op: str | None = None) -> gs.Node | None:
        p = t.inputs[0] if len(t.inputs) == 1 else None
        return p if p is not None and _default(p) and (op is None or p.op == op) else None

    def single_reader(self, t: gs.Tensor) -> bool:
        return len(t.outputs) == 1 and not any(o is t for o in self.graph.outputs)

    def strip(self, t: gs.Tensor) -> tuple[gs.Tensor, list[gs.Node]]:
        """See through Identity nodes that are their input's only reader."""
        chain = []
        while (p := self.producer(t, "Identity")) is not None and self.single_reader(p.inputs[0]):
            chain.append(p)
            t = p.inputs[0]
        return t, chain

    def const(self, t: gs.Tensor) -> np.ndarray | None:
        v = self.view.const(t)
        return None if v is None or not np.issubdtype(v.dtype, np.floating) else v.astype(np.float64)

    def linear(self, node: gs.Node | None) -> list[tuple[gs.Tensor, Any]] | None:
        """The operands of a linear step with the factor each gets (None: 1, NEGATE, or the scale tensor), or
        None."""
        if node is None or not _default(node) or len(node.outputs) != 1:
            return None
        ins = node.inputs
        if node.op == "Add" and len(ins) == 2 or node.op == "Sum" and ins:
            return [(t, None) for t in ins]
        if node.op == "Sub" and len(ins) == 2:
            return [(ins[0], None), (ins[1], NEGATE)]
        if node.op == "Neg" and len(ins) == 1:
            return [(ins[0], NEGATE)]
        if node.op == "Mul" and len(ins) == 2:
            for scale, operand in ((ins[0], ins[1]), (ins[1], ins[0])):
                if self.const(scale) is not None and self.const(operand) is None:
                    return [(operand, scale)]
        return None

    def forward(self, t: gs.Tensor) -> gs.Tensor:
        """Follow Identity nodes that are the only readers: the tensor the next real node reads."""
        while self.single_reader(t) and _default(t.outputs[0]) and t.outputs[0].op == "Identity":
            t = t.outputs[0].outputs[0]
        return t

    def absorbed(self, node: gs.Node) -> bool:
        out = self.forward(node.outputs[0])
        return self.single_reader(out) and self.linear(out.outputs[0]) is not None

    def bn_affine(self, bn: gs.Node, channels: int | None = None) -> tuple[np.ndarray, np.ndarray] | str:
        where = self.view.describe(bn)
        if int(bn.attrs.get("training_mode", 0)) == 1:
            return f"{where} has training_mode=1 (it normalises with batch statistics)"
        if sum(1 for o in bn.outputs if o.name) > 1:
            return f"{where}'s running-statistics outputs are used"
        if int(bn.attrs.get("spatial", 1)) == 0:
            return f"{where} has spatial=0 (per-activation statistics)"
        vals = [self.const(t) for t in bn.inputs[1:5]]
        if len(vals) != 4 or any(v is None for v in vals) or vals[2].ndim != 1:
            return f"{where}: scale / bias / mean / var are not constant per-channel vectors"
        if channels is not None and vals[2].shape[0] != channels:
            return f"{where} has {vals[2].shape[0]} channels, its conv produces {channels}"
        gamma, beta, mean, var = vals
        return km.bn_scale_shift(mean, var, gamma, beta, float(bn.attrs.get("epsilon", 1e-5)))

    def conv_branch(self, conv: gs.Node, bn: gs.Node | None) -> Branch | str:
        where = self.view.describe(conv)
        w = self.view.const(conv.inputs[1]) if len(conv.inputs) > 1 else None
        bias_t = self.view.optional_input(conv, 2)
        b = self.view.const(bias_t) if bias_t is not None else None
        if w is None or (bias_t is not None and b is None):
            return f"the weight or bias of {where} is not a constant"
        if not np.issubdtype(w.dtype, np.floating):
            return f"{where} has a {w.dtype} weight"
        w, b = w.astype(np.float64), None if b is None else b.astype(np.float64)
        nd = w.ndim - 2
        stride = tuple(conv.attrs.get("strides", [1] * nd))
        dilation = tuple(conv.attrs.get("dilations", [1] * nd))
        mode = auto_pad(conv)
        if mode.startswith("SAME") and any(s != 1 for s in stride):
            return f"{where} has auto_pad={mode} with stride {stride}: its pads depend on the input size"
        pads = tuple(zip(*onnx_pads(conv, w.shape[2:]), strict=True))
        groups = int(conv.attrs.get("group", 1))
        if bn is not None:
            affine = self.bn_affine(bn, w.shape[0])
            if isinstance(affine, str):
                return affine
            w, b = km.fold_scale_after(w, b, *affine, groups=groups)
        return Branch(where, w, b, stride, pads, dilation, groups)

    def term(self, tensor: gs.Tensor, factors: tuple, args: tuple) -> Term:
        const = self.const(tensor)
        if const is not None and const.size == 1:
            return Term(tensor, "const", tensor.name, const=const, factors=factors, factor_args=args)
        t, chain = self.strip(tensor)
        removable = self.single_reader(t)
        used = f"{t.name} is also read by {', '.join(self.view.users_besides(t, None)) or 'the graph output'}"
        bn = self.producer(t, "BatchNormalization")
        if bn is not None:
            src, inner = self.strip(bn.inputs[0])
            conv = self.producer(src, "Conv")
            if conv is not None and self.single_reader(src):
                branch = self.conv_branch(conv, bn) if removable else used
                return Term(t, "conv", self.view.describe(conv), self.strip(conv.inputs[0])[0], branch,
                            (*chain, bn, *inner, conv), factors, factor_args=args)
            affine = self.bn_affine(bn) if removable else used
            branch = affine if isinstance(affine, str) else Branch(self.view.describe(bn), bias=affine[1],
                                                                   scale=affine[0])
            return Term(t, "bn", self.view.describe(bn), src, branch, (*chain, bn), factors, factor_args=args)
        conv = self.producer(t, "Conv")
        if conv is not None:
            branch = self.conv_branch(conv, None) if removable else used
            return Term(t, "conv", self.view.describe(conv), self.strip(conv.inputs[0])[0], branch,
                        (*chain, conv), factors, factor_args=args)
        return Term(t, "plain", t.name, factors=factors, factor_args=args)

    def expression(self, root: gs.Node) -> list[Term]:
        terms: list[Term] = []

        def visit(node: gs.Node, factors: tuple, args: tuple) -> None:
            for operand, factor in self.linear(node):
                negate = factor is NEGATE
                f = factors if factor is None else (*factors, _MINUS if negate else self.const(factor))
                a = args if factor is None else (*args, None if negate else factor)
                t, _ = self.strip(operand)
                inner = self.producer(t)
                if inner is not None and self.single_reader(t) and self.linear(inner) is not None:
                    visit(inner, f, a)
                else:
                    terms.append(self.term(operand, f, a))

        visit(root, (), ())
        return terms

    def bn_after(self, root: gs.Node, channels: int):
        out = self.forward(root.outputs[0])
        if not self.single_reader(out):
            return None
        bn = out.outputs[0]
        if not _default(bn) or bn.op != "BatchNormalization" or bn.inputs[0] is not out:
            return None
        affine = self.bn_affine(bn, channels)
        return None if isinstance(affine, str) else (bn, affine)

    # rewriting -----------------------------------------------------------------------------------------
    def run(self) -> bool:
        roots = [n for n in self.graph.nodes if self.linear(n) is not None and not self.absorbed(n)]
        for root in roots:
            self.rewrite(root)
        return self.changed

    def rewrite(self, root: gs.Node) -> None:
        groups, rest = group_terms(self.expression(root))
        consts = [t for t in rest if t.kind == "const"]
        leftovers = [t for t in rest if t.kind != "const"]
        done: list[tuple[list[Term], Merged]] = []
        for group in groups:
            self.report.matched += 1
            merged = merge(group, [] if done else consts)
            if isinstance(merged, str):
                self.report.skip(" + ".join(t.where for t in group), f"merge: {merged}")
                leftovers.extend(group)
                continue
            done.append((group, merged))
        if not done:
            return
        final = root.outputs[0]
        after = self.bn_after(root, done[0][1].weight.shape[0]) if len(done) == 1 and not leftovers else None
        if after is not None:
            bn, (s, t) = after
            m = done[0][1]
            m.weight, m.bias = km.fold_scale_after(m.weight, m.bias, s, t, groups=m.groups)
            final = bn.outputs[0]
        values = []
        for group, m in done:
            values.append(self.emit_conv(group, m))
            bn_name = self.view.describe(after[0]) if after is not None else None
            self.report.note(merged_note(group, bn_name, values[-1].inputs[0].name, m))
            self.report.rewritten += 1
        value = combine(values, leftovers, lambda a, b: self.emit("Add", [a, b], root.name),
                        lambda a: self.emit("Neg", [a], root.name), lambda a, b: self.emit("Mul", [a, b], root.name))
        producer = final.inputs[0]
        producer.outputs.clear()
        last = value.inputs[0]
        last.outputs.clear()
        last.outputs.append(final)
        self.changed = True

    def emit(self, op: str, inputs: list, hint: str, attrs: dict | None = None) -> gs.Variable:
        out = gs.Variable(self.view.fresh_name(f"{hint}_reparam_out"))
        name = self.view.fresh_name(f"{hint}_reparam_{op.lower()}")
        self.graph.nodes.append(gs.Node(op, name, attrs or {}, inputs, [out]))
        return out

    def emit_conv(self, group: list[Term], m: Merged) -> gs.Variable:
        conv = next(t.chain[-1] for t in group if t.kind == "conv")
        dtype = self.view.const(conv.inputs[1]).dtype
        hint = self.view.describe(conv)
        w = gs.Constant(self.view.fresh_name(f"{hint}_reparam_weight"), np.ascontiguousarray(m.weight.astype(dtype)))
        b = gs.Constant(self.view.fresh_name(f"{hint}_reparam_bias"), np.ascontiguousarray(m.bias.astype(dtype)))
        nd = m.weight.ndim - 2
        attrs = {"kernel_shape": list(m.weight.shape[2:]), "strides": list(m.stride),
                 "pads": [*m.pad_begin, *m.pad_end], "dilations": [1] * nd, "group": m.groups}
        return self.emit("Conv", [group[0].key, w, b], hint, attrs)


def merge_graph(graph: gs.Graph, report: PassReport) -> bool:
    """Merge every mergeable expression; return whether the graph changed."""
    return _Rule(graph, report).run()
