"""torch.fx side of the pattern layer: one view over module calls, functional calls and ATen ops.

The same conv can appear three ways in an FX graph: ``call_module`` of an ``nn.Conv2d``, ``call_function`` of
``F.conv2d`` / ``torch.conv2d`` with ``get_attr`` weights (timm and hand-written models), or
``aten.convolution.default`` (graphs from ``make_fx`` / the torch.compile backend). `FxView.kind` gives all of
them the same kind (``conv``, ``conv_transpose``, ``linear``, ``batch_norm``) and `FxView.conv` / `FxView.bn`
read their parameters into one record, so a rule is written once. A conv subclass with its own forward that is
`lkfx.graph.fx.conv_like` (timm's Conv2dSame) has the kind ``conv_like``, and lkfx's `KWConv` ``kw_conv``: only
passes that ask for them see them.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lkfx.graph.fx import conv_like
from lkfx.modules.kernel_warehouse import KWConv

aten = torch.ops.aten

_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_ATEN_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_T_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_ATEN_BN_EVAL = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0,
             "transposed": False, "weight": None, "training": False, "momentum": 0.1, "eps": 1e-5}

# call_function target -> (kind, argument names, returns a tuple whose item 0 is the output)
FUNCTIONS: dict[Any, tuple[str, tuple[str, ...], bool]] = {
    torch.conv1d: ("conv", _CONV, False), torch.conv2d: ("conv", _CONV, False), torch.conv3d: ("conv", _CONV, False),
    torch.conv_transpose1d: ("conv_transpose", _CONV_T, False),
    torch.conv_transpose2d: ("conv_transpose", _CONV_T, False),
    torch.conv_transpose3d: ("conv_transpose", _CONV_T, False),
    F.linear: ("linear", ("input", "weight", "bias"), False),
    F.batch_norm: ("batch_norm", _F_BN, False),
    torch.batch_norm: ("batch_norm", _T_BN, False),
    aten.conv1d.default: ("conv", _CONV, False), aten.conv2d.default: ("conv", _CONV, False),
    aten.conv3d.default: ("conv", _CONV, False),
    aten.convolution.default: ("conv", _ATEN_CONV, False),
    aten.linear.default: ("linear", ("input", "weight", "bias"), False),
    aten.batch_norm.default: ("batch_norm", _T_BN, False),
    aten._native_batch_norm_legit_no_training.default: ("batch_norm", _ATEN_BN_EVAL, True),
    aten._native_batch_norm_legit.default: ("batch_norm", _T_BN[:8], True),
    aten.native_batch_norm.default: ("batch_norm", _T_BN[:8], True),
}

MODULES: dict[type, str] = {
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose1d: "conv_transpose", nn.ConvTranspose2d: "conv_transpose", nn.ConvTranspose3d: "conv_transpose",
    nn.Linear: "linear",
    nn.BatchNorm1d: "batch_norm", nn.BatchNorm2d: "batch_norm", nn.BatchNorm3d: "batch_norm",
    nn.SyncBatchNorm: "batch_norm",
    KWConv: "kw_conv",
}


_METADATA_ATTRS = frozenset({"shape", "ndim", "dtype", "device"})


def is_metadata_read(node: fx.Node) -> bool:
    """``x.shape`` / ``x.ndim`` / ``x.size()`` / ``x.dim()``: reads no values, so a rewrite that keeps the
    shape (a fold) may ignore it. timm's BatchNormAct2d starts with ``_assert(x.ndim == 4)``: one of these."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in ("size", "dim")


def module_kind(module: nn.Module) -> str | None:
    """Kind of a module, or None when it is unknown or a subclass that overrides ``forward``."""
    for base in type(module).__mro__:
        if base in MODULES:
            return MODULES[base] if type(module).forward is base.forward else None
    return None


@dataclass
class ConvInfo:
    node: fx.Node
    kind: str  # conv | conv_transpose | linear
    module: nn.Module | None
    weight: torch.Tensor | None  # None when the weight is computed in the graph
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    own_forward: bool = False  # a `conv_like` module: its forward may transform (pad) the input first

    @property
    def transposed(self) -> bool:
        return self.kind == "conv_transpose"

    def pads_with_zeros(self) -> bool:
        """True when some output tap reads zero padding instead of the input."""
        if self.own_forward:
            raise ValueError(f"the padding a {type(self.module).__name__} applies in its own forward is not known")
        if self.kind == "linear" or self.padding_mode != "zeros" or self.padding == "valid":
            return False
        if self.padding == "same":
            return any(k > 1 for k in self.weight.shape[2:])
        return any(p != 0 for p in self.padding)


@dataclass
class BnInfo:
    node: fx.Node
    module: nn.Module | None
    out: fx.Node  # the node carrying the normalised tensor (getitem 0 for tuple-returning ATen ops)
    mean: torch.Tensor | None
    var: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    training: bool
    extra_outputs_used: bool


def _tuple(v: Any, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


class FxView:
    """Matcher view over a GraphModule plus the helpers rules use to read and rewrite it."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self._modules = dict(gm.named_modules())
        self._index: dict[str, list[fx.Node]] = defaultdict(list)
        self._module_calls: Counter[str] = Counter()
        self._attr_nodes: Counter[str] = Counter()
        for node in gm.graph.nodes:
            k = self.kind(node)
            if k is not None:
                self._index[k].append(node)
            if node.op == "call_module":
                self._module_calls[node.target] += 1
            elif node.op == "get_attr":
                self._attr_nodes[node.target] += 1
        self._tensor_names: dict[int, list[str]] = defaultdict(list)
        for name, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
            self._tensor_names[id(t)].append(name)

    # --- GraphView protocol -------------------------------------------------------------------------
    def candidates(self, kinds: frozenset[str]) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if self.kind(n) in kinds] if len(kinds) > 1 else \
            list(self._index.get(next(iter(kinds)), []))

    def kind(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            m = self._modules.get(node.target)
            if m is None:
                return None
            return module_kind(m) or ("conv_like" if conv_like(m) else None)
        if node.op == "call_function":
            spec = FUNCTIONS.get(node.target)
            if spec is None:
                return None
            if node.target is aten.convolution.default and self.arg(node, "transposed"):
                return "conv_transpose"
            return spec[0]
        return None

    def input_node(self, node: fx.Node, index: int) -> fx.Node | None:
        args = node.args
        if index >= len(args) or not isinstance(args[index], fx.Node):
            return None
        src = args[index]
        # See through getitem(bn, 0) of tuple-returning ATen batch norms.
        if src.op == "call_function" and src.target is operator.getitem and src.args[1] == 0:
            inner = src.args[0]
            if isinstance(inner, fx.Node) and inner.op == "call_function" and FUNCTIONS.get(inner.target, ("",) * 3)[2]:
                return inner
        return src

    def alive(self, node: fx.Node) -> bool:
        return not getattr(node, "_erased", False)

    def describe(self, node: fx.Node) -> str:
        return str(node.target) if node.op == "call_module" else node.name

    # --- reading ------------------------------------------------------------------------------------
    def arg(self, node: fx.Node, name: str) -> Any:
        names = FUNCTIONS[node.target][1]
        i = names.index(name) if name in names else None
        if i is not None and i < len(node.args):
            return node.args[i]
        return node.kwargs.get(name, _DEFAULTS.get(name))

    def set_arg(self, node: fx.Node, name: str, value: Any) -> None:
        i = FUNCTIONS[node.target][1].index(name)
        if i < len(node.args):
            node.update_arg(i, value)
        else:
            node.update_kwarg(name, value)

    def constant(self, value: Any) -> torch.Tensor | None:
        """The tensor behind a get_attr node (None for computed values and graph inputs)."""
        if isinstance(value, fx.Node) and value.op == "get_attr":
            obj = self.gm
            for part in value.target.split("."):
                obj = getattr(obj, part)
            return obj
        return None

    def rank(self, node: fx.Node) -> int | None:
        meta = node.meta.get("tensor_meta")
        return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def conv(self, node: fx.Node) -> ConvInfo:
        kind = self.kind(node)
        if node.op == "call_module":
            m = self._modules[node.target]
            if kind == "linear":
                return ConvInfo(node, kind, m, m.weight, m.bias, (), (), (), 1, "zeros")
            return ConvInfo(node, "conv" if kind == "conv_like" else kind, m, m.weight, m.bias, tuple(m.stride),
                            m.padding if isinstance(m.padding, str) else tuple(m.padding),
                            tuple(m.dilation), m.groups, m.padding_mode, own_forward=kind == "conv_like")
        w = self.constant(self.arg(node, "weight"))
        b_arg = self.arg(node, "bias")
        b = self.constant(b_arg) if b_arg is not None else None
        if kind == "linear":
            return ConvInfo(node, kind, None, w, b, (), (), (), 1, "zeros")
        nd = w.ndim - 2 if w is not None else 2
        pad = self.arg(node, "padding")
        return ConvInfo(node, kind, None, w, b, _tuple(self.arg(node, "stride"), nd),
                        pad if isinstance(pad, str) else _tuple(pad, nd),
                        _tuple(self.arg(node, "dilation"), nd), int(self.arg(node, "groups")), "zeros")

    def computed_conv_args(self, node: fx.Node) -> list[str]:
        """Which of a functional conv's stride / padding / dilation / groups are computed in the graph (e.g.
        ``groups=x.shape[1]``): `conv` cannot read those, so check this first."""
        if node.op != "call_function":
            return []
        names = FUNCTIONS[node.target][1]
        out = []
        for name in ("stride", "padding", "dilation", "groups"):
            found: list[fx.Node] = []
            if name in names:
                fx.node.map_arg(self.arg(node, name), found.append)
            if found:
                out.append(name)
        return out

    def bias_is_computed(self, info: ConvInfo) -> bool:
        return info.module is None and self.arg(info.node, "bias") is not None and info.bias is None

    def bn(self, node: fx.Node) -> BnInfo:
        if node.op == "call_module":
            m = self._modules[node.target]
            # track_running_stats=False leaves running_mean None: bn_refusal says so (it is not training mode)
            return BnInfo(node, m, node, m.running_mean, m.running_var, m.weight, m.bias, m.eps, m.training,
                          False)
        names = FUNCTIONS[node.target][1]
        tuple_out = FUNCTIONS[node.target][2]
        out, extra = node, False
        if tuple_out:
            getitems = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
            firsts = [u for u in getitems if u.args[1] == 0]
            extra = len(getitems) != len(node.users) or len(firsts) != 1 or \
                any(u.users for u in getitems if u.args[1] != 0)
            out = firsts[0] if firsts else node
        training = bool(self.arg(node, "training")) if "training" in names else False
        return BnInfo(node, None, out,
                      self.constant(self.arg(node, "running_mean")), self.constant(self.arg(node, "running_var")),
                      self.constant(self.arg(node, "weight")), self.constant(self.arg(node, "bias")),
                      float(self.arg(node, "eps")), training, extra)

    def bn_refusal(self, bn: BnInfo) -> str | None:
        """Why this BN cannot be treated as a fixed affine map, or None."""
        if bn.training:
            return "BatchNorm is in training mode (it normalises with batch statistics); call .eval() first"
        if bn.mean is None or bn.var is None:
            return "BatchNorm has no constant running statistics (track_running_stats=False or computed)"
        if bn.extra_outputs_used:
            return "BatchNorm's auxiliary outputs (saved mean / inverse std) are used"
        if bn.module is None:
            for name in ("weight", "bias"):
                if self.arg(bn.node, name) is not None and getattr(bn, name) is None:
                    return f"BatchNorm {name} is computed in the graph, not a constant"
        return None

    def module_calls(self, node: fx.Node) -> int:
        """How many call_module nodes call `node`'s module."""
        return self._module_calls[node.target]

    def weight_shared_with(self, info: ConvInfo) -> str | None:
        """Name what else uses this conv's weight (another call site or a tied tensor), or None."""
        if info.module is not None:
            if self._module_calls[info.node.target] > 1:
                return f"module '{info.node.target}' is called {self._module_calls[info.node.target]} times"
            reads = [name for name in (f"{info.node.target}.weight", f"{info.node.target}.bias")
                     if self._attr_nodes[name]]
            if reads:  # e.g. F.conv2d(x, self.conv.weight) beside self.conv(x)
                return f"{' and '.join(reads)} also read directly by the graph"
        else:
            w_node = self.arg(info.node, "weight")
            if len(w_node.users) > 1 or self._attr_nodes[w_node.target] > 1:
                return f"weight '{w_node.target}' is read by several nodes"
            owner = w_node.target.rpartition(".")[0] if w_node.op == "get_attr" else ""
            if self._module_calls[owner]:
                return f"weight '{w_node.target}' is also used by calls of module '{owner}'"
        names = self._tensor_names.get(id(info.weight), [])
        if len(names) > 1:
            return f"weight tensor is tied to {', '.join(names)}"
        return None

    def users_besides(self, node: fx.Node, allowed: fx.Node) -> list[str]:
        """Names of nodes other than `allowed` that read `node`'s values ('graph output' for a graph output).
        Metadata reads (shape, ndim, dtype, size(), dim()) are not counted: a fold keeps the shape."""
        return [("graph output" if u.op == "output" else self.describe(u)) for u in node.users
                if u is not allowed and not is_metadata_read(u)]

    # --- rewriting ----------------------------------------------------------------------------------
    def fresh_name(self, hint: str) -> str:
        """`hint`, else ``hint_1``, ``hint_2``, ...: the first attribute path the GraphModule does not have yet
        (dots name submodules: ``a.b_1`` is free when ``a`` has no ``b_1``). Register it before asking again."""
        name, i = hint, 0
        while self._has(name):
            i += 1
            name = f"{hint}_{i}"
        return name

    def _has(self, path: str) -> bool:
        obj = self.gm
        for part in path.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True


    def swap(self, node: fx.Node, module: nn.Module, suffix: str) -> None:
        """Put `module` where conv `node` was, called on the same input.

        A module called once is replaced in place (its name, so its state-dict keys, stay). A module called more
        than once keeps serving its other calls: this call alone gets `module`, at the root under a fresh name
        ``<target>_<suffix>`` (dots as underscores; see `fresh_name`). A functional conv becomes a call of
        `module`, registered as ``<node name>_<suffix>``; the new node keeps the old one's metadata (shapes)."""
        if node.op == "call_module" and self._module_calls[node.target] == 1:
            self.gm.add_submodule(node.target, module)
            self._modules[node.target] = module
            return
        where = node.target if node.op == "call_module" else node.name
        name = self.fresh_name(f"{where.replace('.', '_')}_{suffix}")
        self.gm.add_submodule(name, module)
        self._modules[name] = module
        self._module_calls[name] = 1
        if node.op == "call_module":
            self._module_calls[node.target] -= 1
            node.target = name
            return
        with self.gm.graph.inserting_before(node):
            new = self.gm.graph.call_module(name, (self.arg(node, "input"),))
        self.replace(node, new)

    def replace(self, node: fx.Node, new: fx.Node) -> None:
        """`new` takes `node`'s place: its users and its metadata (shapes, read by later rules); `node` is erased."""
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)

    def set_params(self, info: ConvInfo, weight: torch.Tensor, bias: torch.Tensor, copy_module: bool) -> None:
        """Give `info.node` new weight and bias. With `copy_module`, others sharing the weight keep the old one."""
        old = info.weight
        new_w = nn.Parameter(weight.to(old.dtype).detach(), requires_grad=old.requires_grad)
        new_b = nn.Parameter(bias.to(old.dtype).detach(), requires_grad=old.requires_grad)
        if info.module is not None:
            module = info.module
            if copy_module:
                module = copy.deepcopy(module)
                name = self.fresh_name(info.node.target.replace(".", "_"))
                self.gm.add_submodule(name, module)
                self._module_calls[info.node.target] -= 1
                info.node.target = name
                self._modules[name] = module
                self._module_calls[name] = 1
            module.weight = new_w
            module.bias = new_b
            return
        with self.gm.graph.inserting_before(info.node):
            for arg, value in (("weight", new_w), ("bias", new_b)):
                name = self.fresh_name(f"{info.node.name}_{arg}")
                self.gm.register_parameter(name, value)
                self.set_arg(info.node, arg, self.gm.graph.get_attr(name))

    def finish(self) -> fx.GraphModule:
        """Dead-code elimination, drop unused submodules and parameters, lint, recompile."""
        g = self.gm.graph
        g.eliminate_dead_code()
        used = {n.target for n in g.nodes if n.op == "get_attr"}
        for name in [n for n, _ in (*self.gm.named_parameters(recurse=False), *self.gm.named_buffers(recurse=False))]:
            if name not in used:
                delattr(self.gm, name)
        self.gm.delete_all_unused_submodules()
        g.lint()
        self.gm.recompile()
        return self.gm
