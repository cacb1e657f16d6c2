"""Random conv networks for property-based tests of the exact passes, built twice from one description: as an
``nn.Module`` (torch.fx frontend) and as an ONNX graph (onnx.helper), with the same weights.

A network is a straight-line program over tensors ``t0 = x, t1, t2, ...`` (each op appends one tensor):

    conv  src, out channels, kernel (kh, kw), stride, dilation, groups, symmetric padding (ph, pw), padding mode
          (zeros / reflect / replicate / circular), bias, and `module`: the index of its weights; two convs with
          the same index are the same nn.Module called twice (FX) / read the same initializers (ONNX), possibly
          with another stride, dilation or padding (FX: F.conv2d on the module's parameters, as is a conv drawn
          `functional`)
    bn    src, affine; `train` keeps one BatchNorm in training mode (FX only; a pass must leave it alone)
    deconv  src, ConvTranspose2d: out channels, kernel, stride, padding, output padding, groups, dilation, bias
    scale src * per-channel constant          add / sub  a, b (same shape)          relu src

In ONNX, some convs write their padding as ``auto_pad`` (VALID, SAME_UPPER, SAME_LOWER) where that is the same.
Branch structures (RepVGG / RepLKNet blocks: parallel convs + BNs + identity summed), BN before and after convs,
residual adds and tensors read by several ops arise from `Draw` choices. Every tensor nothing reads is a graph
output, and with some probability a tensor that is read is an output too.

`Draw` is the only source of choices: `HypothesisDraw` (tests, shrinking to a minimal network) or `RandomDraw`
(the long campaign in scripts/fuzz_campaign.py: one seed = one network).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_MODES = ("zeros", "reflect", "replicate", "circular")
ONNX_PAD_MODE = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}
OPSETS = (13, 17, 20)


class Draw:
    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, items: list | tuple) -> Any:
        return items[self.int(0, len(items) - 1)]

    def bool(self, p: float = 0.5) -> bool:
        return self.int(0, 999) < int(p * 1000)


class RandomDraw(Draw):
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def int(self, lo: int, hi: int) -> int:
        return int(self.rng.integers(lo, hi + 1))


class HypothesisDraw(Draw):
    def __init__(self, data: Any):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        from hypothesis import strategies as st

        return self.data.draw(st.integers(lo, hi))


@dataclass(frozen=True)
class Op:
    kind: str  # conv, bn, scale, add, sub, relu
    srcs: tuple[int, ...]
    module: int = -1  # conv: weight index; bn: its own index
    attrs: tuple = ()  # conv: (cout, (kh, kw), stride, dilation, groups, (ph, pw), mode, bias); bn: (affine, train)
    functional: bool = False  # conv in FX: F.conv2d on the module's parameters instead of calling the module


@dataclass
class Net:
    channels: int
    size: tuple[int, int]
    opset: int
    ops: list[Op] = field(default_factory=list)
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (C, H, W) of each tensor
    extra_outputs: tuple[int, ...] = ()
    seed: int = 0

    def outputs(self) -> list[int]:
        read = {s for op in self.ops for s in op.srcs}
        return sorted(set(range(len(self.shapes))) - read - {0} | set(self.extra_outputs))

    def __str__(self) -> str:
        lines = [f"x: t0 {self.shapes[0]} opset {self.opset} seed {self.seed}"]
        for i, op in enumerate(self.ops, 1):
            lines.append(f"t{i} = {'F.' if op.functional else ''}{op.kind}({', '.join(f't{s}' for s in op.srcs)}) "
                         f"module={op.module} attrs={op.attrs} -> {self.shapes[i]}")
        lines.append(f"outputs: {[f't{o}' for o in self.outputs()]}")
        return "\n".join(lines)


def _out_size(n: int, k: int, s: int, d: int, p: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_attrs(d: Draw, cin: int, hw: tuple[int, int], opset: int, depthwise: bool, same: bool) -> tuple | None:
    """Random conv attributes valid for a (cin, *hw) input, or None when the draw gives no valid conv."""
    divisors = [g for g in range(1, cin + 1) if cin % g == 0]
    groups = cin if depthwise else d.choice(divisors)
    cout = groups * d.int(1, 2) if depthwise else groups * d.int(1, max(1, 8 // groups))
    big = d.bool(0.15)
    kernel = tuple(d.choice((1, 3, 3, 5, 7, 9, 13) if big else (1, 2, 3, 3, 5)) for _ in range(2))
    if d.bool(0.6):
        kernel = (kernel[0], kernel[0])
    stride = d.choice((1, 1, 1, 2, 3))
    dilation = d.choice((1, 1, 1, 2, 3))
    if same:
        kernel = tuple(k | 1 for k in kernel)
        pads = tuple(dilation * (k - 1) // 2 for k in kernel)
    else:
        pads = tuple(d.choice((0, dilation * (k - 1) // 2, d.int(0, k))) for k in kernel)
    modes = PAD_MODES if opset >= 19 else PAD_MODES[:3]
    mode = d.choice(modes) if any(pads) and d.bool(0.3) else "zeros"
    if mode != "zeros" and any(p >= n for p, n in zip(pads, hw, strict=True)):
        mode = "zeros"  # reflect needs pad < size
    if any(_out_size(n, k, stride, dilation, p) < 1 for n, k, p in zip(hw, kernel, pads, strict=True)):
        return None
    return (cout, kernel, stride, dilation, groups, pads, mode, d.bool(0.6))


def _conv_shape(attrs: tuple, hw: tuple[int, int]) -> tuple[int, int, int]:
    cout, kernel, stride, dilation, _, pads, _, _ = attrs
    return (cout, *(_out_size(n, k, stride, dilation, p) for n, k, p in zip(hw, kernel, pads, strict=True)))


def draw_net(d: Draw, max_ops: int = 8, allow_train_bn: bool = True) -> Net:
    c = d.int(1, 6)
    net = Net(c, (d.int(3, 12), d.int(3, 12)), d.choice(OPSETS), seed=d.int(0, 2**31 - 1))
    net.shapes.append((c, *net.size))
    conv_weights: list[tuple[int, tuple]] = []  # (cin, attrs) per weight index
    n_bn = 0

    def add(op: Op, shape: tuple[int, int, int]) -> int:
        net.ops.append(op)
        net.shapes.append(shape)
        return len(net.shapes) - 1

    def conv(src: int, depthwise: bool = False, same: bool = False, attrs: tuple | None = None) -> int | None:
        cin, h, w = net.shapes[src]
        shared = [i for i, (ci, a) in enumerate(conv_weights) if ci == cin and (attrs is None or a == attrs)]
        functional = d.bool(0.2)
        if shared and attrs is None and d.bool(0.2):
            index = d.choice(shared)
            attrs = conv_weights[index][1]
            other = _conv_attrs(d, cin, (h, w), net.opset, False, False) if d.bool(0.5) else None
            if other is not None:  # the same weights with another stride, dilation, padding
                attrs = (*attrs[:2], *other[2:4], attrs[4], *other[5:7], attrs[7])
        else:
            attrs = attrs or _conv_attrs(d, cin, (h, w), net.opset, depthwise, same)
            if attrs is None:
                return None
            conv_weights.append((cin, attrs))
            index = len(conv_weights) - 1
        if any(n < 1 for n in _conv_shape(attrs, (h, w))[1:]) or \
                (attrs[6] != "zeros" and any(p >= n for p, n in zip(attrs[5], (h, w), strict=True))):
            return None
        return add(Op("conv", (src,), index, attrs, functional), _conv_shape(attrs, (h, w)))

    def bn(src: int) -> int:
        nonlocal n_bn
        n_bn += 1
        train = allow_train_bn and d.bool(0.05)
        return add(Op("bn", (src,), n_bn - 1, (d.bool(0.8), train)), net.shapes[src])

    def deconv(src: int) -> int | None:
        cin, h, w = net.shapes[src]
        groups = d.choice([g for g in range(1, cin + 1) if cin % g == 0])
        cout = groups * d.int(1, max(1, 6 // groups))
        k, dilation = d.choice((1, 2, 3, 4)), d.choice((1, 1, 2))
        stride = d.choice((1, 2)) if max(h, w) <= 12 else 1
        pad = d.int(0, dilation * (k - 1) // 2)
        out_pad = d.int(0, stride - 1)  # onnxruntime: output_padding < stride
        sizes = [(n - 1) * stride - 2 * pad + dilation * (k - 1) + out_pad + 1 for n in (h, w)]
        if min(sizes) < 1:
            return None
        return add(Op("deconv", (src,), attrs=(cout, k, stride, pad, out_pad, groups, dilation, d.bool(0.5))),
                   (cout, *sizes))

    def block(src: int) -> int | None:
        """Parallel branches on one tensor, summed: RepVGG / RepLKNet / MobileOne train form."""
        cin, h, w = net.shapes[src]
        depthwise = d.bool(0.4)
        first = _conv_attrs(d, cin, (h, w), net.opset, depthwise, same=True)
        if first is None:
            return None
        terms = []
        for i in range(d.int(1, 3)):
            cout, kernel, stride, dilation, groups, pads, mode, bias = first
            if i:
                kernel = (d.choice((1, 3, 5)),) * 2
                dilation = d.choice((1, 1, 2))
                pads = tuple(dilation * (k - 1) // 2 for k in kernel)
            t = conv(src, attrs=(cout, kernel, stride, dilation, groups, pads, mode, bias))
            if t is None:
                continue
            terms.append(bn(t) if d.bool(0.8) else t)
        if net.shapes[src] == _conv_shape(first, (h, w)) and d.bool(0.5):
            terms.append(bn(src) if d.bool(0.7) else src)
        terms = [t for t in terms if net.shapes[t] == net.shapes[terms[0]]]
        if not terms:
            return None
        acc = terms[0]
        for t in terms[1:]:
            acc = add(Op(d.choice(("add", "add", "sub")), (acc, t)), net.shapes[acc])
        return bn(acc) if len(terms) > 1 and d.bool(0.3) else acc

    for _ in range(d.int(1, max_ops)):
        srcs = list(range(len(net.shapes)))
        src = d.choice(srcs[-3:]) if d.bool(0.7) else d.choice(srcs)  # older tensors: multi-consumer
        kind = d.choice(("conv", "conv", "conv", "bn", "bn", "block", "add", "scale", "relu", "deconv"))
        if kind == "conv":
            conv(src, depthwise=d.bool(0.3))
        elif kind == "deconv":
            deconv(src)
        elif kind == "bn":
            bn(src)
        elif kind == "block":
            block(src)
        elif kind == "scale":
            add(Op("scale", (src,)), net.shapes[src])
        elif kind == "relu":
            add(Op("relu", (src,)), net.shapes[src])
        else:
            same = [t for t in srcs if net.shapes[t] == net.shapes[src]]
            add(Op(d.choice(("add", "sub")), (src, d.choice(same))), net.shapes[src])
    if len(net.shapes) == 1:
        bn(0)
    candidates = [t for t in range(1, len(net.shapes)) if t not in net.outputs()]
    if candidates and d.bool(0.3):
        net.extra_outputs = (d.choice(candidates),)
    return net


# --- weights ------------------------------------------------------------------------------------------------
def weights(net: Net) -> dict[str, np.ndarray]:
    """All parameters by name: conv{i}.weight / .bias, bn{i}.{weight,bias,mean,var}, scale{t}."""
    rng = np.random.default_rng(net.seed)
    out = {}
    for t, op in enumerate(net.ops, 1):
        cin = net.shapes[op.srcs[0]][0]
        if op.kind == "conv" and f"conv{op.module}.weight" not in out:
            cout, kernel, _, _, groups, _, _, bias = op.attrs
            fan_in = cin // groups * math.prod(kernel)
            out[f"conv{op.module}.weight"] = rng.standard_normal((cout, cin // groups, *kernel)) / math.sqrt(fan_in)
            if bias:
                out[f"conv{op.module}.bias"] = rng.uniform(-0.5, 0.5, cout)
        elif op.kind == "deconv":
            cout, k, _, _, _, groups, _, bias = op.attrs
            out[f"deconv{t}.weight"] = rng.standard_normal((cin, cout // groups, k, k)) / math.sqrt(cin * k * k)
            if bias:
                out[f"deconv{t}.bias"] = rng.uniform(-0.5, 0.5, cout)
        elif op.kind == "bn":
            affine = op.attrs[0]
            out[f"bn{op.module}.weight"] = rng.uniform(0.25, 1.75, cin) if affine else np.ones(cin)
            out[f"bn{op.module}.bias"] = rng.uniform(-0.5, 0.5, cin) if affine else np.zeros(cin)
            out[f"bn{op.module}.mean"] = rng.uniform(-1, 1, cin)
            out[f"bn{op.module}.var"] = rng.uniform(0.25, 1.75, cin)
        elif op.kind == "scale":
            out[f"scale{t}"] = rng.uniform(-1.5, 1.5, (cin, 1, 1))
    return {k: v.astype(np.float32) for k, v in out.items()}


def example_input(net: Net, seed: int = 1, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *net.shapes[0])).astype(np.float32)


# --- torch --------------------------------------------------------------------------------------------------
def to_module(net: Net, train_bn: bool = True) -> Any:
    """The network as an nn.Module in eval mode (a BN in training mode where the net says so and `train_bn`)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class FuzzNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = weights(net)
            convs, bns, deconvs = {}, {}, {}
            for t, op in enumerate(net.ops, 1):
                if op.kind == "conv" and op.module not in convs:
                    cout, kernel, stride, dilation, groups, pads, mode, bias = op.attrs
                    conv = nn.Conv2d(net.shapes[op.srcs[0]][0], cout, kernel, stride, pads, dilation, groups, bias,
                                     mode)
                    conv.weight.data = torch.from_numpy(w[f"conv{op.module}.weight"])
                    if bias:
                        conv.bias.data = torch.from_numpy(w[f"conv{op.module}.bias"])
                    convs[op.module] = conv
                elif op.kind == "bn":
                    b = nn.BatchNorm2d(net.shapes[op.srcs[0]][0], affine=op.attrs[0])
                    k = f"bn{op.module}"
                    if op.attrs[0]:
                        b.weight.data = torch.from_numpy(w[f"{k}.weight"])
                        b.bias.data = torch.from_numpy(w[f"{k}.bias"])
                    b.running_mean.copy_(torch.from_numpy(w[f"{k}.mean"]))
                    b.running_var.copy_(torch.from_numpy(w[f"{k}.var"]))
                    bns[op.module] = b
                elif op.kind == "scale":
                    self.register_buffer(f"scale{t}", torch.from_numpy(w[f"scale{t}"]))
                elif op.kind == "deconv":
                    cout, k, stride, pad, out_pad, groups, dilation, bias = op.attrs
                    m = nn.ConvTranspose2d(net.shapes[op.srcs[0]][0], cout, k, stride, pad, out_pad, groups, bias,
                                           dilation)
                    m.weight.data = torch.from_numpy(w[f"deconv{t}.weight"])
                    if bias:
                        m.bias.data = torch.from_numpy(w[f"deconv{t}.bias"])
                    deconvs[str(t)] = m
            self.deconvs = nn.ModuleDict(deconvs)
            self.convs = nn.ModuleDict({str(i): m for i, m in convs.items()})
            self.bns = nn.ModuleDict({str(i): m for i, m in bns.items()})
            self.ops = list(net.ops)
            self.outs = net.outputs()
            first = {}
            for op in net.ops:
                if op.kind == "conv":
                    first.setdefault(op.module, op.attrs)
            self.functional = [op.kind == "conv" and (op.functional or op.attrs != first[op.module]) for op in net.ops]

        def conv(self, op, a):
            m = self.convs[str(op.module)]
            _, _, stride, dilation, groups, (ph, pw), mode, _ = op.attrs
            if mode != "zeros":
                a, ph, pw = F.pad(a, (pw, pw, ph, ph), mode=mode), 0, 0
            return F.conv2d(a, m.weight, m.bias, stride, (ph, pw), dilation, groups)

        def forward(self, x):
            ts = [x]
            for t, op in enumerate(self.ops, 1):
                a = ts[op.srcs[0]]
                if op.kind == "conv":
                    ts.append(self.conv(op, a) if self.functional[t - 1] else self.convs[str(op.module)](a))
                elif op.kind == "bn":
                    ts.append(self.bns[str(op.module)](a))
                elif op.kind == "scale":
                    ts.append(a * getattr(self, f"scale{t}"))
                elif op.kind == "deconv":
                    ts.append(self.deconvs[str(t)](a))
                elif op.kind == "relu":
                    ts.append(torch.relu(a))
                elif op.kind == "add":
                    ts.append(a + ts[op.srcs[1]])
                else:
                    ts.append(a - ts[op.srcs[1]])
            return tuple(ts[o] for o in self.outs)

    model = FuzzNet().eval()
    for op in net.ops:
        if op.kind == "bn" and op.attrs[1] and train_bn:
            model.bns[str(op.module)].train()
    return model


# --- ONNX ---------------------------------------------------------------------------------------------------
def to_onnx(net: Net) -> Any:
    """The network as an ONNX model at `net.opset` (BN in training mode becomes an inference BN: ONNX has no
    equivalent a runtime would run)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = weights(net)
    nodes, inits = [], [numpy_helper.from_array(v, k) for k, v in sorted(w.items())]
    for t, op in enumerate(net.ops, 1):
        a, y = f"t{op.srcs[0]}", f"t{t}"
        if op.kind == "conv":
            _, kernel, stride, dilation, groups, pads, mode, bias = op.attrs
            if mode != "zeros":
                pad_name = f"pads{t}"
                inits.append(numpy_helper.from_array(np.array([0, 0, *pads, 0, 0, *pads], np.int64), pad_name))
                nodes.append(helper.make_node("Pad", [a, pad_name], [f"{y}_padded"], name=f"pad{t}",
                                              mode=ONNX_PAD_MODE[mode]))
                a, pads = f"{y}_padded", (0, 0)
            ins = [a, f"conv{op.module}.weight"] + ([f"conv{op.module}.bias"] if bias else [])
            padding = {"pads": [*pads, *pads]}
            same = stride == dilation == 1 and all(k % 2 and p == (k - 1) // 2  # onnxruntime: no dilated SAME
                                                   for k, p in zip(kernel, pads, strict=True))
            if (net.seed + t) % 3 == 0 and (same or not any(pads)):  # the same padding written as auto_pad
                padding = {"auto_pad": "VALID" if not any(pads) else ("SAME_UPPER", "SAME_LOWER")[net.seed % 2]}
            nodes.append(helper.make_node("Conv", ins, [y], name=f"conv_t{t}", kernel_shape=list(kernel),
                                          strides=[stride] * 2, dilations=[dilation] * 2, group=groups, **padding))
        elif op.kind == "bn":
            k = f"bn{op.module}"
            nodes.append(helper.make_node("BatchNormalization", [a] + [f"{k}.{p}" for p in ("weight", "bias", "mean",
                                          "var")], [y], name=f"bn_t{t}"))
        elif op.kind == "scale":
            nodes.append(helper.make_node("Mul", [a, f"scale{t}"], [y], name=f"mul_t{t}"))
        elif op.kind == "deconv":
            _, k, stride, pad, out_pad, groups, dilation, bias = op.attrs
            ins = [a, f"deconv{t}.weight"] + ([f"deconv{t}.bias"] if bias else [])
            nodes.append(helper.make_node("ConvTranspose", ins, [y], name=f"deconv_t{t}", kernel_shape=[k, k],
                                          strides=[stride] * 2, pads=[pad] * 4, output_padding=[out_pad] * 2,
                                          group=groups, dilations=[dilation] * 2))
        elif op.kind == "relu":
            nodes.append(helper.make_node("Relu", [a], [y], name=f"relu_t{t}"))
        else:
            nodes.append(helper.make_node(op.kind.capitalize(), [a, f"t{op.srcs[1]}"], [y], name=f"{op.kind}_t{t}"))
    outs = net.outputs()
    graph = helper.make_graph(
        nodes, "fuzz", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [2, *net.shapes[0]])],
        [helper.make_tensor_value_info(f"t{o}", TensorProto.FLOAT, [2, *net.shapes[o]]) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", net.opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model
