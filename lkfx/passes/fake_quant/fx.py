"""fake_quant on torch.fx: weight and activation fake-quant where an int8 backend quantizes.

Post-training (``qat=False``): BatchNorms are folded first (`fold_bn`), then::

    x -> conv(W, b)          becomes      x -> FakeQuant -> conv(WeightFakeQuant(W), b)

Every conv / linear / ungrouped conv-transpose, module or functional, reads its weight through a
`WeightFakeQuant` (symmetric, per output channel, ``weight_bits``); a module becomes the functional call on the
same parameters (its padding mode kept), so the state dict keeps its names. Activations get one `FakeQuant` per
tensor (per-tensor, ``act_bits``, asymmetric unless ``act_symmetric``), placed by ``placement``:

- ``tensorrt`` (TensorRT / ModelOpt QDQ rules): the data inputs of conv, conv-transpose, linear and matmul, and
  the skip input of a residual add: not the one straight from such a layer (TensorRT fuses it with the add), with
  layers on both sides the shorter branch, nothing when the add is no residual; the rule is `lkfx.quant.placement`,
  shared with ONNX. Other consumers of a quantized tensor keep reading the float value.
- ``ort`` (onnxruntime's QDQ format): those inputs plus the outputs of these ops (after a ReLU that is their only
  reader, which onnxruntime then drops), so each becomes one int8 kernel.

QAT (``qat=True``): module conv -> BatchNorm pairs become `ConvBnFakeQuant` (folded, fake-quantized weights with
the batch-statistics correction until `lkfx.quant.freeze_bn`), the activation quantizers track moving-average
ranges in training mode. With ``ctx.calib_data`` (``transform(..., calib_data=batches)``) the model is
calibrated at the end (`lkfx.calibrate`); otherwise call `lkfx.calibrate` (or, for QAT, train) before using it.
"""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lkfx.errors import LkfxError
from lkfx.modules.fake_quant import ConvBnFakeQuant, FakeQuant, WeightFakeQuant
from lkfx.passes import PassContext
from lkfx.patterns.fx import FxView, is_metadata_read
from lkfx.quant import fallback
from lkfx.quant.observers import OPTIONS, make_observer
from lkfx.quant.placement import residual_skip

aten = torch.ops.aten
PLACEMENTS = ("tensorrt", "ort")
_ADD = {operator.add, operator.iadd, torch.add, aten.add.Tensor}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, torch.bmm, aten.mm.default, aten.bmm.default,
           aten.matmul.default}
_RELU = {F.relu, torch.relu, aten.relu.default}
_FUNCTIONAL = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def check_config(config: dict[str, Any]) -> None:
    """Refuse bad option values with a message that lists the valid ones."""
    if config["placement"] not in PLACEMENTS:
        raise LkfxError(f"fake_quant placement must be one of {', '.join(PLACEMENTS)}, got {config['placement']!r}")
    for key in ("weight_bits", "act_bits"):
        if not (isinstance(config[key], int) and 2 <= config[key] <= 8):
            raise LkfxError(f"fake_quant {key} must be an integer from 2 to 8, got {config[key]!r}")
    for key in ("num_batches", "batch_size"):
        if not (isinstance(config[key], int) and config[key] >= 0):
            meaning = "all" if key == "num_batches" else "as given"
            raise LkfxError(f"fake_quant {key} must be an integer >= 0 (0 = {meaning}), got {config[key]!r}")
    fallback.check_options(config)
    make_observer(config["method"], **observer_options(config))  # validates the method and its options


def observer_options(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in OPTIONS if k in config}


def _is(node: fx.Node, functions: set, methods: tuple[str, ...], modules: tuple[type, ...] = ()) -> bool:
    """Whether `node` calls one of `functions`, a method named in `methods`, or a module of a type in `modules`."""
    if node.op == "call_function":
        return node.target in functions
    if node.op == "call_method":
        return node.target in methods
    if node.op == "call_module":
        return isinstance(node.graph.owning_module.get_submodule(node.target), modules)
    return False


_OP_TYPES = {"conv": "Conv", "conv_transpose": "ConvTranspose", "linear": "Gemm"}  # FX kinds as ONNX op types


def _excluded(gm: fx.GraphModule, view: FxView, exclude: list[str]) -> set[fx.Node]:
    """The nodes `exclude` names: by node name, module path, module class (``Conv2d``) or ONNX op type (``Conv``,
    ``Gemm``, ``MatMul``, ``Add``: the same entries work on both frontends). An entry naming nothing is an error."""
    def names(node: fx.Node) -> set[str]:
        out = {node.name, *([node.target] if isinstance(node.target, str) else [])}
        if node.op == "call_module":
            out.add(type(gm.get_submodule(node.target)).__name__)
        kind = view.kind(node)
        if kind in _OP_TYPES:
            out.add(_OP_TYPES[kind])
        if _is(node, _MATMUL, ("matmul", "mm", "bmm")):
            out.add("MatMul")
        if _is(node, _ADD, ("add", "add_")):
            out.add("Add")
        return out

    table = {n: names(n) for n in gm.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    out: set[fx.Node] = set()
    for entry in exclude:
        hit = {n for n, ns in table.items() if entry in ns}
        if not hit:
            raise LkfxError(f"exclude: '{entry}' names no node of the model (give a node name, a module path, a "
                            "module class such as Conv2d, or an op type: Conv, ConvTranspose, Gemm, MatMul, Add)")
        out |= hit
    return out


def _is_activation(value: Any) -> bool:
    """A tensor computed in the graph (or a graph input): not a constant, not a shape / size value."""
    if not isinstance(value, fx.Node) or value.op in ("get_attr", "output") or is_metadata_read(value):
        return False
    if value.op == "call_function" and value.target is operator.getitem:
        return _is_activation(value.args[0])
    return True


def _fuse_refusal(gm: fx.GraphModule, view: FxView, conv_node: fx.Node, bn_node: fx.Node) -> str | None:
    conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
    if others := view.users_besides(conv_node, bn_node):
        return f"the conv output is also used by {', '.join(others)}"
    if shared := view.weight_shared_with(view.conv(conv_node)):
        return shared
    if sum(n.op == "call_module" and n.target == bn_node.target for n in gm.graph.nodes) > 1:
        return "the BatchNorm module is called several times"
    if bn.running_var is None:
        return "BatchNorm has no running statistics"
    if bn.num_features != conv.out_channels:
        return f"BatchNorm has {bn.num_features} channels, the conv {conv.out_channels}"
    return None


def _fuse_conv_bn(gm: fx.GraphModule, view: FxView, bits: int, ctx: PassContext, per_channel: bool,
                  excluded: set[fx.Node]) -> int:
    """QAT: module conv -> module BatchNorm pairs become one ConvBnFakeQuant (under the conv's name)."""
    fused = 0
    for bn_node in view.candidates(frozenset({"batch_norm"})):
        conv_node = bn_node.args[0] if bn_node.args else None
        if bn_node.op != "call_module" or not isinstance(conv_node, fx.Node) or conv_node.op != "call_module" \
                or view.kind(conv_node) != "conv":
            continue
        where = f"{conv_node.target} + {bn_node.target}"
        if conv_node in excluded:
            continue
        ctx.report.matched += 1
        reason = _fuse_refusal(gm, view, conv_node, bn_node)
        if reason:
            ctx.report.skip(where, f"conv->bn (QAT fold): {reason}")
            continue
        conv, bn = gm.get_submodule(conv_node.target), gm.get_submodule(bn_node.target)
        gm.add_submodule(conv_node.target, ConvBnFakeQuant(conv, bn, bits, per_channel))
        bn_node.replace_all_uses_with(conv_node)
        gm.graph.erase_node(bn_node)
        fused += 1
    return fused


def _functional_conv(gm: fx.GraphModule, node: fx.Node, module: nn.Module, weight: fx.Node) -> fx.Node:
    """The call of a module conv / linear as F.* on the module's own parameters, reading `weight`."""
    g = gm.graph
    bias = g.get_attr(f"{node.target}.bias") if module.bias is not None else None
    x = node.args[0]
    if isinstance(module, nn.Linear):
        return g.call_function(F.linear, (x, weight, bias))
    padding = module.padding
    if module.padding_mode != "zeros":
        x = g.call_function(F.pad, (x, module._reversed_padding_repeated_twice), {"mode": module.padding_mode})
        padding = 0
    nd = module.weight.ndim - 2
    if module.transposed:
        return g.call_function(_TRANSPOSED[nd], (x, weight, bias, module.stride, padding, module.output_padding,
                                                 module.groups, module.dilation))
    return g.call_function(_FUNCTIONAL[nd], (x, weight, bias, module.stride, padding, module.dilation,
                                             module.groups))


def _quantize_weights(gm: fx.GraphModule, view: FxView, config: dict[str, Any], ctx: PassContext,
                      excluded: set[fx.Node]) -> int:
    done, bits = 0, config["weight_bits"]
    for node in view.candidates(frozenset({"conv", "linear", "conv_transpose"})):
        ctx.report.matched += 1
        where, info = view.describe(node), view.conv(node)
        if node in excluded:
            ctx.report.skip(where, f"excluded (exclude={';'.join(config['exclude'])}): weight and input stay float")
            continue
        if info.weight is None:
            ctx.report.skip(where, "the weight is computed in the graph, not a parameter")
            continue
        if info.transposed and info.groups > 1:
            ctx.report.skip(where, "grouped ConvTranspose: output channels are not one weight axis")
            continue
        if info.transposed and node.op == "call_module" and len(node.args) + len(node.kwargs) > 1:
            ctx.report.skip(where, "ConvTranspose called with output_size")
            continue
        name = view.fresh_name(f"{node.name}_weight_fq")
        axis = (1 if info.transposed else 0) if config["per_channel"] else None
        gm.add_submodule(name, WeightFakeQuant(bits, axis=axis))
        with gm.graph.inserting_before(node):
            if node.op == "call_module":
                module = gm.get_submodule(node.target)
                wq = gm.graph.call_module(name, (gm.graph.get_attr(f"{node.target}.weight"),))
                new = _functional_conv(gm, node, module, wq)
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            else:
                w = view.arg(node, "weight")
                view.set_arg(node, "weight", gm.graph.call_module(name, (w,)))
        done += 1
    return done


def _placement(gm: fx.GraphModule, view: FxView, placement: str, excluded: set[fx.Node]
               ) -> tuple[list[tuple[fx.Node, fx.Node]], list[fx.Node]]:
    """(source, consumer) pairs whose consumer must read the quantized source, and sources quantized for all;
    nothing for an `excluded` consumer."""

    def layer_inputs(node: fx.Node) -> list | None:
        if node in excluded:
            return None
        fused = node.op == "call_module" and isinstance(gm.get_submodule(node.target), ConvBnFakeQuant)
        if fused or view.kind(node) in ("conv", "conv_transpose", "linear"):
            return [node.args[0]]
        if _is(node, _MATMUL, ("matmul", "mm", "bmm")):
            return list(node.args[:2])
        return None

    def parents(node: fx.Node) -> list[fx.Node]:
        return [a for a in node.all_input_nodes if _is_activation(a)]

    inputs: list[tuple[fx.Node, fx.Node]] = []
    outputs: list[fx.Node] = []
    for node in gm.graph.nodes:
        srcs = layer_inputs(node)
        if srcs is None and node not in excluded and _is(node, _ADD, ("add", "add_")) \
                and sum(_is_activation(a) for a in node.args[:2]) == 2:
            srcs = list(node.args[:2])
            if placement == "tensorrt":
                skip = residual_skip(srcs, lambda v: layer_inputs(v) is not None, parents)
                srcs = [] if skip is None else [srcs[skip]]
        if srcs is None:
            continue
        inputs += [(s, node) for s in srcs if _is_activation(s)]
        if placement == "ort":
            users = [u for u in node.users if not is_metadata_read(u)]
            relu = users[0] if len(users) == 1 and _is(users[0], _RELU, ("relu",), (nn.ReLU,)) else None
            outputs.append(relu or node)
    return inputs, outputs


def _quantize_activations(gm: fx.GraphModule, view: FxView, config: dict[str, Any], excluded: set[fx.Node]) -> int:
    inputs, outputs = _placement(gm, view, config["placement"], excluded)
    last_input = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    quantized: dict[fx.Node, fx.Node] = {}

    def quantizer(src: fx.Node) -> fx.Node:
        if src not in quantized:
            name = view.fresh_name(f"{src.name}_fq")
            gm.add_submodule(name, FakeQuant(bits=config["act_bits"], symmetric=config["act_symmetric"],
                                             method=config["method"], options=observer_options(config),
                                             qat=config["qat"], momentum=OPTIONS["momentum"]))
            with gm.graph.inserting_after(last_input if src.op == "placeholder" else src):
                quantized[src] = gm.graph.call_module(name, (src,))
        return quantized[src]

    for src in outputs:
        fq = quantizer(src)
        src.replace_all_uses_with(fq, delete_user_cb=lambda user, fq=fq: user is not fq)
    for src, consumer in inputs:
        consumer.replace_input_with(src, quantizer(src))
    return len(quantized)


def run_fx(gm: fx.GraphModule, ctx: PassContext, config: dict[str, Any]) -> fx.GraphModule:
    from lkfx.passes.fold_bn import FoldBN
    from lkfx.report import PassReport

    check_config(config)
    if not any(n.op == "placeholder" for n in gm.graph.nodes):
        raise LkfxError("fake_quant needs a model with at least one input")
    if config["fallback"] == "auto" and (config["qat"] or ctx.calib_data is None):
        raise LkfxError("fallback=auto measures the quantized model on calibration data: give calib_data= to "
                        "lkfx.transform (and qat=false)")
    report = ctx.report
    if config["qat"]:
        excluded = _excluded(gm, FxView(gm), config["exclude"])
        fused = _fuse_conv_bn(gm, FxView(gm), config["weight_bits"], ctx, config["per_channel"], excluded)
        report.rewritten += fused
        report.note(f"QAT: {fused} conv + BatchNorm pair(s) fused (BN folded into fake-quantized weights)")
    else:
        sub = PassReport("fold_bn", "fx")
        gm = FoldBN().run_fx(gm, PassContext(sub, ctx.example_inputs))
        report.note(f"fold_bn first: {sub.rewritten} BatchNorm(s) folded")
        for s in sub.skipped:
            report.skip(s.where, f"fold_bn: {s.reason}")
        excluded = _excluded(gm, FxView(gm), config["exclude"])
    reference = copy.deepcopy(gm) if config["fallback"] == "auto" else None
    view = FxView(gm)
    weights = _quantize_weights(gm, view, config, ctx, excluded)
    activations = _quantize_activations(gm, FxView(gm), config, excluded)
    report.matched += activations
    report.rewritten += weights + activations
    kind = "symmetric" if config["act_symmetric"] else "asymmetric"
    axis = "per output channel" if config["per_channel"] else "per tensor"
    report.note(f"{weights} weight quantizer(s) (int{config['weight_bits']}, symmetric {axis}), "
                f"{activations} activation quantizer(s) (int{config['act_bits']} {kind} per tensor, "
                f"{config['method']})")
    report.note(PLACEMENT_NOTES[config["placement"]])
    gm = view.finish()
    if ctx.calib_data is not None:
        from lkfx.quant.calibrate import calibrate

        calibrate(gm, ctx.calib_data, num_batches=config["num_batches"], batch_size=config["batch_size"])
        report.note(f"calibrated with {config['method']}")
        for name, m in gm.named_modules():
            if isinstance(m, FakeQuant) and m.guard:
                report.note(f"range of {name}: {m.guard}")
        if reference is not None:
            _fallback(gm, reference, ctx.calib_data, config, report)
    return gm


PLACEMENT_NOTES = {
    "tensorrt": "placement=tensorrt: fake-quant only on layer inputs and residual skips, the QDQ layout TensorRT "
                "fuses into int8 kernels; exported to ONNX, onnxruntime runs it partly in float (on CPU ~3x slower "
                "than placement=ort): for onnxruntime use placement=ort",
    "ort": "placement=ort: fake-quant on the inputs and outputs of every quantized op, the QDQ layout onnxruntime "
           "turns into integer kernels; for TensorRT use placement=tensorrt. On x86 CPUs without VNNI (AVX2) "
           "onnxruntime's int8 kernels saturate with 8-bit weights: quantize with weight_bits=7 for those",
}


def _fallback(gm: fx.GraphModule, reference: fx.GraphModule, data: Any, config: dict[str, Any], report: Any) -> None:
    """Keep the worst layers in float (weight and inputs read unquantized; the search: `lkfx.quant.fallback`)."""
    from lkfx.quant.calibrate import _batches

    batches = _batches(gm, data, config["num_batches"])
    with torch.no_grad():
        expected = [_flat(reference(*b)) for b in batches]
    quantizers = (FakeQuant, WeightFakeQuant)
    layers = {}
    for node in gm.graph.nodes:
        fq = [a for a in node.all_input_nodes
              if a.op == "call_module" and isinstance(gm.get_submodule(a.target), quantizers)]
        weights = [a for a in fq if isinstance(gm.get_submodule(a.target), WeightFakeQuant)]
        if weights:
            source = weights[0].args[0]
            name = source.target.rsplit(".", 1)[0] if source.op == "get_attr" else node.name
            layers[name] = (node, fq)

    def set_float(names: set[str], on: bool) -> None:
        for name in names:
            node, fq = layers[name]
            for q in fq:
                node.replace_input_with(*((q, q.args[0]) if on else (q.args[0], q)))
        gm.recompile()

    def error(names: set[str]) -> float:
        set_float(names, True)
        was = gm.training
        gm.eval()
        with torch.no_grad():
            got = [_flat(gm(*b)) for b in batches]
        gm.train(was)
        set_float(names, False)
        return fallback.relative_error(got, expected)

    kept, note = fallback.float_layers(list(layers), error, config["fallback_bound"])
    for k, why in kept.items():
        report.skip(k, f"kept in float by fallback=auto: {why}")
    if kept:
        set_float(set(kept), True)
        gm.graph.eliminate_dead_code()
        gm.delete_all_unused_submodules()
        gm.recompile()
        report.rewritten -= len(kept)
    report.note(note)


def _flat(out: Any) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in torch.utils._pytree.tree_leaves(out)
                      if isinstance(t, torch.Tensor)])
