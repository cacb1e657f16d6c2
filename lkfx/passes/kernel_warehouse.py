"""kernel_warehouse: turn a ConvNet's convs into KernelWarehouse dynamic convs, a warehouse per stage (FX).

    x ── Conv(W) ── y        becomes        x ─┬─────────────────────────── conv(x, W_x) ── y
                                               └─ attention(x) ── alpha ──┘  W_x = assemble(alpha @ E_stage)

The model's math is in `lkfx.modules.kernel_warehouse`; this pass decides which convs share a warehouse.

``sharing="stage"`` (default; needs ``example_inputs``): shapes are propagated and the convs that work at one
feature-map size form a stage (stage 0: the largest). The official models' handover: a conv whose output is
smaller than its input and which reads a stage output (a tensor every input -> output path goes through, such
as a residual block's input) belongs to the previous stage: ResNet18's strided conv1 and every strided
downsample; ResNet50's strided 3x3 reads an inner tensor and stays in the new stage. Convs that keep the size
belong to its stage (so ResNet50's first 1x1 of a stage is in the previous one). Depthwise convs (groups = in
channels > 1) get a warehouse of their own per stage (``stage2_dw``), as in the official MobileNetV2 and
ConvNeXt, and so do other grouped convs (``stage2_grouped``, ResNeXt), whose few in/groups channels would
shrink a shared cell. Convs whose input is 1 x 1 spatially (squeeze-excitation on pooled features) stay
static.
``sharing={conv name: warehouse name}``: exactly these convs, grouped as given (names as in the report).

Options: ``budget`` b (1/4, 1/2, 1, 2, 4, ...), warehouse size ``n = int(b sum m)``; ``cell_ratio`` scales the
gcd cell channels (default 1 for b >= 1, 1/2 below); ``reduction``: the attention's hidden width ratio (1/16,
at least 16 wide); ``nonlocal_basis`` < 1 maps the other layers' cells through a smaller basis (the official
ResNet50 1/2x uses 1/16; default 1, off); ``exclude``: regular expressions searched in the conv's module path
or node name, where the entry ``"stem"`` names the graph's first conv, static as in the paper (``exclude=()``
converts it too). ``max_attention`` (64): a warehouse whose attentions would hold more than this many times
its cells' parameters is not built and its convs stay static, with the reason in the report. The attention of
a conv grows as ``m (n + 1)``, so a stage whose channel counts have a small gcd (EfficientNet's 40 / 80 / 112,
cells 8x8) would otherwise get millions of attention parameters per conv; the official ConvNeXt-T and
MobileNetV2 at 1x stay under 30.

Not exact (``exact = False``): a training-time rewrite into a different model, with more (b > 1) or fewer
(b < 1) parameters and an attention branch per conv. Each conv's kernel is loaded into the cells beta assigns
it, so at ``tau = 1`` with b >= 1 the new model computes what the old one did (``check=True`` passes there);
training then decays tau to 0 (`lkfx.set_temperature`, `lkfx.modules.kernel_warehouse.TemperatureSchedule`).

Against the official, hand-written models: ResNet18 and ResNet50 get the same warehouses and parameter counts
(ResNet50 1/2x with ``nonlocal_basis=1/16``), except that ResNet50's first 1x1 conv and its stride-1
downsample are dynamic here and static there. The official MobileNetV2 splits its 64- and 96-channel blocks
into two stages, hands a stage's whole first block over and keeps expand and project convs apart at 4x; the
size-based stages here mix more channel counts, so their cells are smaller and the attentions larger (1x:
14.0M parameters, official 5.17M). That grouping given as ``sharing`` reproduces 5.17M (1x) and 11.38M (4x).
Report: each warehouse with its convs, cell size, n, m per conv, cell and attention parameters; the total
parameters before and after.
"""

from __future__ import annotations

import math
import re
from typing import Any

from lkfx.errors import LkfxError
from lkfx.passes import Pass, PassContext, register_pass

STEM = "stem"


@register_pass
class KernelWarehouse(Pass):
    name = "kernel_warehouse"
    summary = "Replace convs with KernelWarehouse dynamic convs, one warehouse per stage (for training)."
    options = {"budget": 1.0, "cell_ratio": None, "reduction": 1 / 16, "nonlocal_basis": 1.0,
               "exclude": (STEM,), "sharing": "stage", "max_attention": 64.0}
    exact = False
    module_fallback = False  # stages and the stem are properties of the whole graph

    def __init__(self, **options: Any):
        super().__init__(**options)
        cfg = self.config
        for key, low, high in (("budget", 0, math.inf), ("reduction", 0, 1), ("nonlocal_basis", 0, 1),
                               ("max_attention", 0, math.inf)):
            if not low < cfg[key] <= high:
                raise LkfxError(f"option '{key}' of pass '{self.name}' must be in ({low}, {high}], "
                                f"got {cfg[key]!r}")
        ratio = cfg["cell_ratio"]
        if ratio is not None and not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
            raise LkfxError(f"option 'cell_ratio' of pass '{self.name}' must be None or in (0, 1], "
                            f"got {ratio!r}")
        exclude = cfg["exclude"]
        cfg["exclude"] = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        sharing = cfg["sharing"]
        if sharing != "stage" and not (isinstance(sharing, dict) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in sharing.items())):
            raise LkfxError(f"option 'sharing' of pass '{self.name}' must be 'stage' or a "
                            f"{{conv name: warehouse name}} dict, got {sharing!r}")

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from lkfx.modules.kernel_warehouse import KWConv

        return (KWConv,)

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        from lkfx.graph.fx import propagate_shapes
        from lkfx.modules.kernel_warehouse import convert_convs
        from lkfx.patterns.fx import FxView

        cfg, report = self.config, ctx.report
        stages = cfg["sharing"] == "stage"
        view = FxView(gm)
        nodes = view.candidates(frozenset(["conv"]))
        if stages:
            if ctx.example_inputs is None:
                raise LkfxError("pass 'kernel_warehouse' with sharing='stage' needs example_inputs=(tensor, "
                                "...) to find the stages from feature-map sizes; or give "
                                "sharing={conv: warehouse}")
            propagate_shapes(gm, ctx.example_inputs)
        else:
            names = {view.describe(n) for n in nodes}
            unknown = sorted(set(cfg["sharing"]) - names)
            if unknown:
                raise LkfxError(f"sharing names convs that are not in the graph: {unknown}; "
                                f"the convs are {sorted(names)}")

        chosen = []
        for node in nodes:
            report.matched += 1
            reason = self._refusal(view, node, node is nodes[0])
            if reason:
                report.skip(view.describe(node), reason)
            else:
                chosen.append((node, view.conv(node)))
        keys = _stage_names(gm, view, chosen) if stages else \
            [cfg["sharing"][view.describe(n)] for n, _ in chosen]
        groups: dict[str, list] = {}
        for key, item in zip(keys, chosen, strict=True):
            groups.setdefault(key, []).append(item)

        before = _count(gm)
        for name, items in list(groups.items()):
            reason = self._oversized(items)
            if reason:
                for node, _ in items:
                    report.skip(view.describe(node), f"warehouse {name}: {reason}")
                del groups[name]
        for name, items in groups.items():
            kws = convert_convs([info for _, info in items], cfg["budget"], cfg["cell_ratio"],
                                cfg["reduction"], cfg["nonlocal_basis"])
            for (node, info), kw in zip(items, kws, strict=True):
                kw.train(info.module.training if info.module is not None else gm.training)
                view.swap(node, kw, "kw")
                report.rewritten += 1
            wh, lay = kws[0].warehouse, kws[0].warehouse.layout
            attention = sum(p.numel() for k in kws for n, p in k.named_parameters()
                            if n != "bias" and not n.startswith("warehouse."))
            report.note(f"warehouse {name}: {len(items)} convs, cells {lay.cell_out}x{lay.cell_in}, "
                        f"n={lay.n}, m={list(lay.m)}, {wh.cells.numel()} cell + {attention} attention "
                        f"parameters: {', '.join(view.describe(n) for n, _ in items)}")
        if not report.modified:
            return gm
        gm = view.finish()
        after = _count(gm)
        report.note(f"{len(groups)} warehouses at budget {cfg['budget']:g}; parameters {before} -> {after} "
                    f"({after / before:.1%})")
        return gm

    def _oversized(self, items: list) -> str | None:
        """Why a warehouse is not built: no cell left, or attentions over max_attention times its cells."""
        from lkfx.modules.kernel_warehouse import attention_parameters, layout

        cfg = self.config
        try:
            lay = layout([tuple(info.weight.shape) for _, info in items], cfg["budget"], cfg["cell_ratio"])
        except ValueError as e:
            return str(e)
        cells = lay.n * lay.cell_out * lay.cell_in
        attention = sum(attention_parameters(lay, i, info.weight.shape[1] * info.groups, cfg["reduction"],
                                             cfg["nonlocal_basis"]) for i, (_, info) in enumerate(items))
        if attention <= cfg["max_attention"] * cells:
            return None
        channels = sorted({c for _, info in items for c in info.weight.shape[:2]})
        return (f"its cells would be {lay.cell_out}x{lay.cell_in} (gcd of the channel counts {channels}), "
                f"its attentions {attention} parameters: over max_attention={cfg['max_attention']:g} times "
                f"its {cells} cell parameters; split it with sharing={{conv: warehouse}} or exclude convs")

    def _refusal(self, view: Any, node: Any, first: bool) -> str | None:
        cfg, where = self.config, view.describe(node)
        if first and STEM in cfg["exclude"]:
            return "the stem (the graph's first conv) stays static, as in the paper; exclude=() converts it"
        hit = next((p for p in cfg["exclude"] if p != STEM and re.search(p, where)), None)
        if hit is not None:
            return f"excluded by {hit!r}"
        if cfg["sharing"] != "stage" and where not in cfg["sharing"]:
            return "not named in the sharing mapping"
        computed = view.computed_conv_args(node)
        if computed:
            return f"its {', '.join(computed)} computed in the graph"
        info = view.conv(node)
        if info.weight is None or view.bias_is_computed(info):
            return "its weight or bias is computed in the graph, not a parameter"
        if not info.weight.is_floating_point():
            return f"the weight is {info.weight.dtype}, not floating point"
        shared = view.weight_shared_with(info)
        if shared:
            return f"weight shared ({shared}): one dynamic conv per use would untie it"
        if info.padding == "same" and any(d * (k - 1) % 2 for k, d in
                                          zip(info.weight.shape[2:], info.dilation, strict=True)):
            return "padding='same' pads this even kernel unevenly"
        if cfg["sharing"] == "stage":
            shape = _shape(_input(view, node))
            if shape is None or _shape(node) is None:
                return "no shape recorded for it on the example inputs"
            if math.prod(shape[2:]) == 1:
                return "its input is 1 x 1 spatially (pooled features, e.g. squeeze-excitation)"
        return None


def _input(view: Any, node: Any) -> Any:
    return view.arg(node, "input") if node.op == "call_function" else node.args[0]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _count(gm: Any) -> int:
    return sum(p.numel() for p in gm.parameters())


def _stage_names(gm: Any, view: Any, chosen: list) -> list[str]:
    """Each chosen conv's warehouse: its stage (feature-map size, handover included), and a suffix for
    depthwise ('_dw') and other grouped ('_grouped') convs, whose cells have other shapes."""
    cut = _cut_nodes(gm.graph)
    keys = []
    for node, info in chosen:
        x = _input(view, node)
        size_in, size_out = _shape(x)[2:], _shape(node)[2:]
        size = size_in if size_in != size_out and x in cut else size_out
        kind = "" if info.groups == 1 else "_dw" if info.weight.shape[1] == 1 else "_grouped"
        keys.append((size, kind))
    order = sorted({size for size, _ in keys}, key=lambda s: (-math.prod(s), len(s), s))
    return [f"stage{order.index(size)}{kind}" for size, kind in keys]


def _cut_nodes(graph: Any) -> set:
    """The nodes every input -> output path goes through (stage outputs, residual blocks' inputs).

    In topological order, a node on an input -> output path is such a cut iff no edge jumps over it. Edges
    into metadata reads (``x.shape``) carry no values and are ignored."""
    from lkfx.patterns.fx import is_metadata_read

    nodes = list(graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    reach, stack = set(), [n for n in nodes if n.op == "placeholder"]
    while stack:
        n = stack.pop()
        if n not in reach:
            reach.add(n)
            stack.extend(u for u in n.users if not is_metadata_read(u))
    live, stack = set(), [n for n in nodes if n.op == "output"]
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    on_path = reach & live
    cut, far = set(), -1
    for n in nodes:
        if n not in on_path:
            continue
        if far <= pos[n]:
            cut.add(n)
        far = max(far, pos[n], *(pos[u] for u in n.users if u in on_path))
    return cut
