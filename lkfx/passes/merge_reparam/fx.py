"""merge_reparam on torch.fx: modules' own deploy methods first, then the generic rule over linear expressions.

Module protocol. Why leaves: a traced graph keeps only the leaf modules, so a block's own method can only be
called if the block survives tracing. `MergeReparam.fx_leaf_modules` therefore names every module type whose
class defines ``fuse()``, ``reparameterize()`` or ``switch_to_deploy()`` (timm's protocol), and
`lkfx.transform` traces those blocks as single ``call_module`` nodes (of the copy it owns). Each block is
converted once, on a float64 copy cast back afterwards: ``fuse()``'s result replaces it, the other two convert
it in place, then its children the same way (timm's ``reparameterize_model`` order). The deploy form is traced
and inlined at every call of the block, so later rules and passes see its conv; a plain container holding what
the inlined nodes read takes the block's place. A block in training mode, or whose method raises, is refused
with the reason and inlined unconverted: the generic rule below may still merge what is inside it. A block that
the conversion leaves unchanged (already in deploy form) is inlined and not counted.

Generic rule: see the package docstring. Merged convs become a new ``nn.ConvNd`` module (named
``<common prefix>.reparam_conv``), or for ATen graphs a copy of the first conv call with new constants.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from lkfx import kernel_math as km
from lkfx.graph import fx as gfx
from lkfx.patterns.fx import FxView, is_metadata_read, module_kind
from lkfx.report import PassReport

from .core import Branch, Merged, Term, combine, group_terms, merge, merged_note

PROTOCOL = ("fuse", "reparameterize", "switch_to_deploy")
aten = torch.ops.aten
_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_LINEAR = {
    operator.add: "add", operator.iadd: "add", torch.add: "add", aten.add.Tensor: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", aten.sub.Tensor: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul", aten.mul.Tensor: "mul",
    operator.neg: "neg", torch.neg: "neg", aten.neg.default: "neg",
}


def protocol_method(module: nn.Module) -> str | None:
    """The first deploy method the module's class defines (a method, not e.g. a submodule named ``fuse``)."""
    return next((name for name in PROTOCOL if inspect.isfunction(getattr(type(module), name, None))), None)


def leaf_types(model: nn.Module) -> tuple[type, ...]:
    return tuple({type(m) for name, m in model.named_modules() if name and protocol_method(m)})


# --- module protocol --------------------------------------------------------------------------------------
def _convert(module: nn.Module) -> nn.Module:
    """timm's order: the module's own method, then its children's."""
    method = protocol_method(module)
    if method == "fuse":
        out = module.fuse()
        module = out if isinstance(out, nn.Module) else module
    elif method is not None:
        getattr(module, method)()
    for name, child in list(module.named_children()):
        new = _convert(child)
        if new is not child:
            setattr(module, name, new)
    return module


def _deploy(module: nn.Module) -> nn.Module | str:
    """The deploy form of a copy of `module`, converted in float64 (then in its own dtype if that fails)."""
    if any(m.training for m in module.modules()):
        return "the module is in training mode (its BatchNorms use batch statistics); call .eval() first"
    dtype = next((p.dtype for p in (*module.parameters(), *module.buffers()) if p.is_floating_point()), None)
    error: Exception | None = None
    for work_dtype in (torch.float64, None) if dtype not in (None, torch.float64) else (None,):
        work = copy.deepcopy(module)
        try:
            with torch.no_grad():
                out = _convert(work.to(work_dtype) if work_dtype else work)
            return out.to(dtype) if work_dtype else out
        except Exception as e:  # third-party conversion code raises anything
            error = e
    return f"its {protocol_method(module)}() raised {type(error).__name__}: {error}"


def _inlinable(node: fx.Node, sub: fx.GraphModule) -> bool:
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    output = next(n for n in sub.graph.nodes if n.op == "output")
    names = {p.target for p in placeholders}
    if len(node.args) > len(placeholders) or set(node.kwargs) - names or not isinstance(output.args[0], fx.Node):
        return False
    given = len(node.args)
    return all(i < given or ph.target in node.kwargs or ph.args for i, ph in enumerate(placeholders))


def _inline(gm: fx.GraphModule, node: fx.Node, sub: fx.GraphModule) -> None:
    """Replace call_module `node` by the nodes of `sub` (traced from the module at node.target); `_inlinable`."""
    env: dict[fx.Node, Any] = {}
    for i, ph in enumerate(n for n in sub.graph.nodes if n.op == "placeholder"):
        if i < len(node.args):
            env[ph] = node.args[i]
        else:
            env[ph] = node.kwargs[ph.target] if ph.target in node.kwargs else ph.args[0]  # the default
    output = next(n for n in sub.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(node):
        for n in sub.graph.nodes:
            if n.op in ("placeholder", "output"):
                continue
            target = f"{node.target}.{n.target}" if n.op in ("get_attr", "call_module") else n.target
            new = gm.graph.create_node(n.op, target, fx.node.map_arg(n.args, env.__getitem__),
                                       fx.node.map_arg(n.kwargs, env.__getitem__), n.name, n.type)
            new.meta = copy.copy(n.meta)
            env[n] = new
    node.replace_all_uses_with(env[output.args[0]])
    gm.graph.erase_node(node)


def _install(gm: fx.GraphModule, nodes: list[fx.Node], module: nn.Module) -> str | None:
    """Put `module` at the target of the call_module `nodes` and inline its traced graph at each of them; a note
    when it stays a call_module.

    Once inlined, a plain container holding what the graph reads (the traced GraphModule's children, parameters
    and buffers) takes the block's place, so no half-converted block object stays in the model."""
    target = nodes[0].target
    gm.add_submodule(target, module)
    if module_kind(module) is not None or fx.Tracer().is_leaf_module(module, target):
        return None
    try:
        sub = gfx.trace(module)
    except gfx.TraceError as e:
        return f"kept as one module ({e})"
    if not all(_inlinable(node, sub) for node in nodes):
        return "kept as one module (its forward's signature cannot be inlined)"
    for node in nodes:
        _inline(gm, node, sub)
    holder = nn.Module()
    holder._modules.update(sub._modules)
    holder._parameters.update(sub._parameters)
    holder._buffers.update(sub._buffers)
    gm.add_submodule(target, holder)
    return None


def _unchanged(before: nn.Module, after: nn.Module) -> bool:
    """Whether a conversion left the module as it was (a block already in deploy form)."""
    a, b = before.state_dict(), after.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def merge_modules(gm: fx.GraphModule, report: PassReport) -> bool:
    """Convert every call_module block that has a deploy method (once per module, inlined at every call).
    Returns whether the graph changed."""
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and protocol_method(gm.get_submodule(node.target)) is not None:
            calls.setdefault(node.target, []).append(node)
    for target, nodes in calls.items():
        module = gm.get_submodule(target)
        method = protocol_method(module)
        where = f"{target} ({type(module).__name__})"
        deployed = _deploy(module)
        if isinstance(deployed, str):
            report.matched += 1
            report.skip(where, f"module {method}(): {deployed}")
            deployed = module
        elif not _unchanged(module, deployed):
            report.matched += 1
            report.rewritten += 1
            report.note(f"{where}: merged by its own {method}()")
        note = _install(gm, nodes, deployed)
        if note:
            report.note(f"{where}: {note}")
    return bool(calls)


# --- generic rule -----------------------------------------------------------------------------------------
def _data_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if not is_metadata_read(u)]


class _Rule:
    def __init__(self, gm: fx.GraphModule, report: PassReport):
        self.gm, self.report = gm, report
        self.view = FxView(gm)
        self.modules = dict(gm.named_modules())

    # reading -------------------------------------------------------------------------------------------
    def passthrough(self, node: Any) -> bool:
        if not isinstance(node, fx.Node) or node.op != "call_module":
            return False
        m = self.modules.get(node.target)
        return isinstance(m, nn.Identity) or (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training)

    def strip(self, value: Any) -> tuple[Any, list[fx.Node]]:
        """See through Identity / eval Dropout modules that only feed what follows; return them too."""
        chain = []
        while self.passthrough(value) and len(_data_users(value)) == 1:
            chain.append(value)
            value = value.args[0]
        return value, chain

    def linear(self, node: Any) -> tuple[str, Any, Any] | None:
        """(op, operand(s), scale) when `node` is a linear step: add / sub (two operands), neg, or mul by a
        constant (operand, and the scale's graph value)."""
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_function":
            op = _LINEAR.get(node.target)
            extra = {k: v for k, v in node.kwargs.items() if not (k == "alpha" and v == 1)}
        elif node.op == "call_method" and node.target in ("add", "sub", "mul", "neg"):
            op, extra = node.target, node.kwargs
        else:
            return None
        if op is None or extra or len(node.args) != (1 if op == "neg" else 2):
            return None
        if op == "neg":
            return op, node.args[0], None
        a, b = node.args
        if op != "mul":
            return op, (a, b), None
        for scale, operand in ((a, b), (b, a)):
            if self.constant(scale) is not None and self.constant(operand) is None:
                return op, operand, scale
        return None

    def constant(self, value: Any) -> np.ndarray | None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return np.asarray(float(value))
        t = self.view.constant(value)
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().cpu().double().numpy()
        return None

    def bn_node(self, node: fx.Node) -> fx.Node | None:
        """The batch-norm behind `node` (itself, or getitem 0 of a tuple-returning ATen batch norm)."""
        if self.view.kind(node) == "batch_norm":
            return node
        if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
            inner = node.args[0]
            if isinstance(inner, fx.Node) and self.view.kind(inner) == "batch_norm" and self.view.bn(inner).out is node:
                return inner
        return None

    def conv_branch(self, node: fx.Node, bn_node: fx.Node | None) -> Branch | str:
        v = self.view
        where = v.describe(node)
        computed = v.computed_conv_args(node)
        if computed:
            return f"the {', '.join(computed)} of {where} are computed in the graph"
        info = v.conv(node)
        if info.weight is None or v.bias_is_computed(info):
            return f"the weight or bias of {where} is computed in the graph, not a constant"
        if not info.weight.is_floating_point():
            return f"{where} has a {info.weight.dtype} weight"
        if info.padding_mode != "zeros":
            return f"{where} pads with '{info.padding_mode}'; only zero padding merges"
        w = info.weight.detach().cpu().double().numpy()
        b = None if info.bias is None else info.bias.detach().cpu().double().numpy()
        ks = w.shape[2:]
        if info.padding == "valid":
            pads = ((0,) * len(ks), (0,) * len(ks))
        elif info.padding == "same":
            total = [d * (k - 1) for k, d in zip(ks, info.dilation, strict=True)]
            pads = (tuple(t // 2 for t in total), tuple(t - t // 2 for t in total))
        else:
            pads = (tuple(info.padding), tuple(info.padding))
        if bn_node is not None:
            affine = self.bn_affine(bn_node, w.shape[0])
            if isinstance(affine, str):
                return affine
            w, b = km.fold_scale_after(w, b, *affine, groups=info.groups)
        return Branch(where, w, b, tuple(info.stride), pads, tuple(info.dilation), info.groups)

    def bn_affine(self, node: fx.Node, channels: int | None = None) -> tuple[np.ndarray, np.ndarray] | str:
        bn = self.view.bn(node)
        reason = self.view.bn_refusal(bn)
        if reason:
            return f"{self.view.describe(node)}: {reason}"
        if channels is not None and bn.mean.numel() != channels:
            return f"{self.view.describe(node)} has {bn.mean.numel()} channels, its conv produces {channels}"

        def f64(t):
            return None if t is None else t.detach().cpu().double().numpy()

        return km.bn_scale_shift(f64(bn.mean), f64(bn.var), f64(bn.weight), f64(bn.bias), bn.eps)

    def term(self, value: Any, factors: tuple, args: tuple) -> Term:
        const = self.constant(value)
        if const is not None and const.size == 1:
            return Term(value, "const", repr(value), const=const, factors=factors, factor_args=args)
        node, chain = self.strip(value)
        if not isinstance(node, fx.Node):
            return Term(node, "plain", repr(node), factors=factors, factor_args=args)
        where = self.view.describe(node)
        removable = len(_data_users(node)) == 1
        bn = self.bn_node(node)
        if bn is not None:
            src, inner = self.strip(bn.args[0])
            if self.view.kind(src) == "conv" and len(_data_users(src)) == 1:
                branch = self.conv_branch(src, bn) if removable else self.used_elsewhere(node)
                return Term(node, "conv", self.view.describe(src), self.conv_input(src), branch,
                            (*chain, node, bn, *inner, src), factors, factor_args=args)
            branch = self.bn_affine(bn) if removable else self.used_elsewhere(node)
            if not isinstance(branch, str):
                branch = Branch(where, bias=branch[1], scale=branch[0])
            return Term(node, "bn", where, src, branch, (*chain, node, bn), factors, factor_args=args)
        if self.view.kind(node) == "conv":
            branch = self.conv_branch(node, None) if removable else self.used_elsewhere(node)
            return Term(node, "conv", where, self.conv_input(node), branch, (*chain, node), factors,
                        factor_args=args)
        return Term(node, "plain", where, factors=factors, factor_args=args)

    def conv_input(self, node: fx.Node) -> Any:
        value = self.view.arg(node, "input") if node.op == "call_function" else node.args[0]
        return self.strip(value)[0]

    def used_elsewhere(self, node: fx.Node) -> str:
        others = [self.view.describe(u) for u in _data_users(node)]
        return f"the output of {self.view.describe(node)} is read by {len(others)} nodes ({', '.join(others)})"

    def absorbed(self, node: fx.Node) -> bool:
        """Whether `node`'s value only feeds (through passthroughs) another linear step."""
        users = _data_users(node)
        while len(users) == 1 and self.passthrough(users[0]):
            users = _data_users(users[0])
        return len(users) == 1 and self.linear(users[0]) is not None

    def expression(self, root: fx.Node) -> tuple[list[Term], list[fx.Node]]:
        """The terms of the linear expression rooted at `root`, and its inner nodes (root included)."""
        terms: list[Term] = []
        inner: list[fx.Node] = []
        minus = np.asarray(-1.0)

        def visit(value: Any, factors: tuple, args: tuple, top: bool) -> None:
            node, chain = self.strip(value)
            step = self.linear(node) if top or (isinstance(node, fx.Node) and len(_data_users(node)) == 1) else None
            if step is None:
                terms.append(self.term(value, factors, args))
                return
            inner.extend([*chain, node])
            op, operands, scale = step
            if op in ("add", "sub"):
                visit(operands[0], factors, args, False)
                visit(operands[1], (*factors, minus) if op == "sub" else factors,
                      (*args, None) if op == "sub" else args, False)
            elif op == "neg":
                visit(operands, (*factors, minus), (*args, None), False)
            else:
                visit(operands, (*factors, self.constant(scale)), (*args, scale), False)

        visit(root, (), (), True)
        return terms, inner

    def bn_after(self, root: fx.Node, channels: int):
        """(BN node, its output node, (s, t)) when `root`'s value only feeds an inference BN, else None."""
        users = _data_users(root)
        prev = root
        while len(users) == 1 and self.passthrough(users[0]):
            prev, users = users[0], _data_users(users[0])
        if len(users) != 1 or self.view.kind(users[0]) != "batch_norm" or users[0].args[0] is not prev:
            return None
        affine = self.bn_affine(users[0], channels)
        return None if isinstance(affine, str) else (users[0], self.view.bn(users[0]).out, affine)

    # rewriting -----------------------------------------------------------------------------------------
    def run(self) -> None:
        roots = [n for n in self.gm.graph.nodes if self.linear(n) is not None and not self.absorbed(n)]
        for root in roots:
            self.rewrite(root)

    def rewrite(self, root: fx.Node) -> None:
        terms, inner = self.expression(root)
        groups, rest = group_terms(terms)
        consts = [t for t in rest if t.kind == "const"]
        leftovers = [t for t in rest if t.kind != "const"]
        done: list[tuple[list[Term], Merged, Any]] = []
        for group in groups:
            self.report.matched += 1
            where = " + ".join(t.where for t in group)
            merged = merge(group, [] if done else consts)
            padding, reason = (None, merged) if isinstance(merged, str) else \
                self.padding(merged, self.conv_nodes(group)[0])
            if reason:
                self.report.skip(where, f"merge: {reason}")
                leftovers.extend(group)
                continue
            done.append((group, merged, padding))
        if not done:
            return
        final = root
        after = self.bn_after(root, done[0][1].weight.shape[0]) if len(done) == 1 and not leftovers else None
        if after is not None:
            bn, final, (s, t) = after
            m = done[0][1]
            m.weight, m.bias = km.fold_scale_after(m.weight, m.bias, s, t)
        outs = []
        for group, merged, padding in done:
            out = self.emit(group, merged, padding)
            outs.append(out)
            for t in group:
                self.redirect_metadata(t.chain, out)
            bn_name = self.view.describe(bn) if after is not None else None
            self.report.note(merged_note(group, bn_name, self.view.describe(out), merged))
            self.report.rewritten += 1
        graph = self.gm.graph
        with graph.inserting_before(root):
            value = combine(outs, leftovers, lambda a, b: graph.call_function(operator.add, (a, b)),
                            lambda a: graph.call_function(operator.neg, (a,)),
                            lambda a, b: graph.call_function(operator.mul, (a, b)))
        self.redirect_metadata(inner, outs[0])
        final.replace_all_uses_with(value)

    def redirect_metadata(self, nodes, new: fx.Node) -> None:
        for n in nodes:
            if isinstance(n, fx.Node):
                for u in [u for u in n.users if is_metadata_read(u)]:
                    u.replace_input_with(n, new)

    def conv_nodes(self, group: list[Term]) -> list[fx.Node]:
        return [t.chain[-1] for t in group if t.kind == "conv"]

    def padding(self, m: Merged, conv: fx.Node) -> tuple[Any, str | None]:
        """(padding argument, None) for a torch conv with the merged paddings: ints or 'same'; or (None, reason)."""
        if m.pad_begin == m.pad_end:
            return tuple(m.pad_begin), None
        same = all(b == (k - 1) // 2 and b + e == k - 1
                   for b, e, k in zip(m.pad_begin, m.pad_end, m.weight.shape[2:], strict=True))
        if same and all(s == 1 for s in m.stride) and not str(conv.target).startswith("aten."):
            return "same", None
        return None, f"the merged conv needs paddings {m.pad_begin} before and {m.pad_end} after, which torch " \
                     "cannot express"

    def emit(self, group: list[Term], m: Merged, padding: Any) -> fx.Node:
        """The merged conv, inserted right after the tensor it reads."""
        convs = self.conv_nodes(group)
        first = self.view.conv(convs[0])
        x = group[0].key
        ref = first.weight
        weight = nn.Parameter(torch.from_numpy(m.weight).to(ref.dtype).to(ref.device), requires_grad=ref.requires_grad)
        bias = nn.Parameter(torch.from_numpy(m.bias).to(ref.dtype).to(ref.device), requires_grad=ref.requires_grad)
        nd = m.weight.ndim - 2
        graph = self.gm.graph
        with graph.inserting_before(x.next):
            if not str(convs[0].target).startswith("aten."):
                module = _CONV_MODULES[nd](m.weight.shape[1] * m.groups, m.weight.shape[0], m.weight.shape[2:],
                                           m.stride, padding, groups=m.groups, device=ref.device, dtype=ref.dtype)
                module.weight, module.bias = weight, bias
                name = self.fresh(convs)
                self.gm.add_submodule(name, module)
                return graph.call_module(name, (x,))
            names = [self.fresh(convs, f"{convs[0].name}_{arg}") for arg in ("weight", "bias")]
            for name, p in zip(names, (weight, bias), strict=True):
                self.gm.register_parameter(name, p)
            w_node, b_node = graph.get_attr(names[0]), graph.get_attr(names[1])
            node = graph.node_copy(convs[0])
            for arg, value in (("input", x), ("weight", w_node), ("bias", b_node), ("padding", list(padding)),
                               ("dilation", [1] * nd)):
                self.view.set_arg(node, arg, value)
            return node

    def fresh(self, convs: list[fx.Node], base: str | None = None) -> str:
        """A free attribute path: ``<common module prefix of the convs>.reparam_conv`` unless `base` is given."""
        if base is None:
            paths = [n.target.split(".")[:-1] for n in convs if n.op == "call_module"]
            prefix = []
            for parts in zip(*paths, strict=False):
                if len(set(parts)) > 1:
                    break
                prefix.append(parts[0])
            base = ".".join([*prefix, "reparam_conv"])
        return self.view.fresh_name(base)


def merge_graph(gm: fx.GraphModule, report: PassReport) -> None:
    _Rule(gm, report).run()
