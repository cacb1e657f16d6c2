"""merge_reparam: merge parallel conv branches that are summed into one conv (RepVGG, RepLKNet, MobileOne deploy).

Generic rule, on both frontends. A linear expression (``+``, ``-``, unary ``-``, ``*`` by a constant that is one
value per channel, ONNX ``Add`` / ``Sum`` / ``Sub`` / ``Neg`` / ``Mul``) whose terms are branches reading the
same tensor ``x`` — a conv, a conv followed by an inference BatchNorm, a BatchNorm alone, ``x`` itself — becomes
one conv; a scalar constant term joins the bias, and an inference BatchNorm that alone reads the sum is folded
in as well::

    x ─┬─ Conv kxk ── BN ─┐
       ├─ Conv 1x1 ── BN ─┼─ Add ── [BN] ── y    becomes    x ── Conv KxK (W, b) ── y
       └──────────── BN ──┘

    branch i: y_i = s_i (W_i * x + b_i) + t_i      (BN folded: s, t; an identity is W_i = delta)
    W = sum_i c_i place(dilate(s_i W_i)),   b = sum_i c_i (s_i b_i + t_i)

with ``c_i`` the per-channel constant factors on the path of term i. Every branch is expanded to a dilation-1
kernel (zeros between dilated taps), placed at offset ``P - p_i`` inside the merged kernel (``P`` = the largest
begin padding), an identity branch is a delta at tap ``P`` per group; the geometry is in `core`. Even kernels,
torch's asymmetric 'same' padding, ONNX begin/end pads, kernels larger than the feature map and stride 2 need no
special case. Refused, with the reason in the report: branches that differ in stride, groups or channels, or that
give different output sizes (e.g. a dilation whose padding does not keep 'same'); an identity with stride > 1 or
in != out channels; a non-zero padding mode; ONNX ``auto_pad=SAME_*`` with stride > 1 (its pads depend on the
input size); weights computed in the graph; BN in training mode; a branch output that is read elsewhere.
Terms that do not join a group stay as they are and are added to the merged conv. Math in float64, cast back.

FX first honours modules' own ``fuse()`` / ``reparameterize()`` / ``switch_to_deploy()`` (timm's RepVGG,
MobileOne, FastViT, RepViT blocks, lkfx's `ReparamLargeKernelConv`): `fx_leaf_modules` makes `lkfx.transform`
trace those blocks whole, and each is converted on a float64 copy, then inlined (see `fx`). The generic rule then
runs over the whole graph, so a model traced without those leaves (a GraphModule given by the user) is merged by
the rule alone. Run ``fold_bn`` afterwards for BatchNorms that are not part of a sum.
"""

from __future__ import annotations

from typing import Any

from lkfx.passes import Pass, PassContext, register_pass


@register_pass
class MergeReparam(Pass):
    name = "merge_reparam"
    summary = "Merge summed parallel conv / BN / identity branches into one conv (RepVGG / RepLK deploy form)."
    options: dict[str, Any] = {}

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from .fx import leaf_types

        return leaf_types(model)

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        from lkfx.patterns.fx import FxView

        from .fx import merge_graph, merge_modules

        changed = merge_modules(gm, ctx.report)
        before = ctx.report.rewritten
        merge_graph(gm, ctx.report)
        if changed or ctx.report.rewritten > before:
            return FxView(gm).finish()
        return gm

    def run_onnx(self, graph: Any, ctx: PassContext) -> None:
        from .onnx import merge_graph

        if merge_graph(graph, ctx.report):
            graph.cleanup().toposort()
