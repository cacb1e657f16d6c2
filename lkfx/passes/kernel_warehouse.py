"""kernel_warehouse: turn a ConvNet's convs into KernelWarehouse dynamic convs, warehouses per stage (FX).

    x ── Conv(W) ── y        becomes        x ─┬─────────────────────────── conv(x, W_x) ── y
                                               └─ attention(x) ── alpha ──┘  W_x = assemble(alpha @ E_wh)

The model's math is in `lkfx.modules.kernel_warehouse`; this pass decides which convs share a warehouse and
how each warehouse is built. ``nn.Linear`` layers applied over feature maps (channels last, e.g. ConvNeXt's
MLPs) are 1x1 convs and are converted like them.

``sharing="stage"`` (default; needs ``example_inputs``) reproduces the official models' warehouses from the
graph alone:

1. Blocks. The *cut* tensors (every input -> output path goes through them) split the graph. The convs
   between two cuts form a block (a residual block: ResNet, ConvNeXt, MobileNetV2 with a skip). Convs on the
   chain itself (no skip) are blocks of their own, except that a depthwise conv takes the pointwise conv that
   feeds it (its *expand*) and the pointwise conv it feeds (its *project*) into its block (an inverted
   residual block without a skip).
2. Stages = rows of the block table: runs of consecutive blocks with the same output width and size (two
   rows of MobileNetV2-0.5 have width 16). The first block of each
   row after the first is handed over to the previous stage: a whole block on the chain; from a residual
   block only the convs that read the block's input (ResNet's first conv and its downsample). A row whose
   every conv is handed over (one chain block, e.g. MobileNetV2's 320-row or its 1x1 head) makes no stage.
3. Roles. Depthwise convs (in/groups = 1) and other grouped convs get a warehouse of their own per stage.
   In a stage with depthwise convs, dense kxk convs (ConvNeXt's downsampling) are apart from the pointwise
   ones; at budgets other than 1 the pointwise convs are split into *expand* (feeding a depthwise conv) and
   *project* (the others). In a stage without depthwise convs (ResNet) all convs share one warehouse.
4. The stem (the graph's first conv) stays static by default, as in the official ResNets (``exclude=()``
   gives it a warehouse of its own, as in the official MobileNetV2 and ConvNeXt; its attention is < 5k
   parameters). Convs reading pooled 1 x 1 features (squeeze-excitation, the classifier) stay static.
5. Budgets. b >= 1: every warehouse has ``n = int(b sum m)`` cells of gcd channels, reduction 1/16.
   Below 1, as the official recipes: networks without depthwise convs (ResNet) halve the cell channels,
   and when the attentions would then hold over half the cells' parameters (ResNet50, whose stages share
   12-19 convs), they map the other layers' cells through a basis of 1/16 (``nonlocal_basis``). Networks
   with depthwise convs (MobileNetV2) keep the depthwise warehouses (and a dynamic stem) at 1x, leave the
   pointwise and dense convs of every stage but the last static, build the last stage's expand and project
   warehouses at b with half cells, make the classifier dynamic at b (cells: all outputs x 1/40 of the
   inputs), and use attention reduction 1/32.

``sharing={conv name: warehouse name}``: exactly these convs, grouped as given (names as in the report), each
warehouse at ``budget``.

Options: ``budget`` b (1/4, 1/2, 1, 2, 4, ...); ``cell_ratio``, ``reduction``, ``nonlocal_basis``: None for the
recipe above, or a value for every warehouse; ``exclude``: regular expressions searched in the conv's module
path or node name, where the entry ``"stem"`` names the graph's first conv. ``max_attention`` (64): a warehouse
whose attentions would hold more than this many times its cells' parameters is not built and its convs stay
static, with the reason in the report (a small gcd of channel counts makes tiny cells, and the attention of
a conv grows as ``m (n + 1)``).

Against the official, hand-written models (torchvision / timm definitions): ResNet18 (1/4x-4x), ResNet50
(1/2x, 1x, 4x), MobileNetV2 1.0 and 0.5 (1/2x, 1x, 4x) and ConvNeXt-T (1x) get the official warehouses and
the paper's parameter counts within 0.35 % (ResNet18 1/4x: -1.2 %, where the official code's model has exactly
lkfx's count); differences: ResNet50's first 1x1 conv and its stride-1 downsample are dynamic
here and static there, the stems as in 4., ConvNeXt's attentions use BatchNorm1d (official: LayerNorm).

Not exact (``exact = False``): a training-time rewrite into a different model, with more (b > 1) or fewer
(b < 1) parameters and an attention branch per conv. Each conv's kernel is loaded into the cells beta assigns
it, so at ``tau = 1`` with b >= 1 the new model computes what the old one did (``check=True`` passes there);
training then decays tau to 0 (`lkfx.set_temperature`, `lkfx.modules.kernel_warehouse.TemperatureSchedule`).
Report: one line per warehouse (name, convs, cell shape, n, budget, kernel and attention parameters, member
convs), the convs left static with the reason, and the total parameters before and after.
"""

from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from typing import Any

from lkfx.errors import LkfxError
from lkfx.passes import Pass, PassContext, register_pass

STEM = "stem"
CLASSIFIER_CELL_IN = 1 / 40  # the official 1/2x MobileNetV2 classifier: cells of all outputs x 1280/40 inputs


@dataclass(frozen=True)
class Spec:
    """How one warehouse is built."""

    budget: float
    cell_ratio: float | tuple[float, float] | None
    reduction: float
    nonlocal_basis: float


@register_pass
class KernelWarehouse(Pass):
    name = "kernel_warehouse"
    summary = "Replace convs with KernelWarehouse dynamic convs, warehouses per stage (for training)."
    options = {"budget": 1.0, "cell_ratio": None, "reduction": None, "nonlocal_basis": None,
               "exclude": (STEM,), "sharing": "stage", "max_attention": 64.0}
    exact = False
    module_fallback = False  # stages and the stem are properties of the whole graph

    def __init__(self, **options: Any):
        super().__init__(**options)
        cfg = self.config
        for key, low, high in (("budget", 0, math.inf), ("reduction", 0, 1), ("nonlocal_basis", 0, 1),
                               ("max_attention", 0, math.inf), ("cell_ratio", 0, 1)):
            value, optional = cfg[key], key in ("reduction", "nonlocal_basis", "cell_ratio")
            if not (optional and value is None or isinstance(value, (int, float)) and low < value <= high):
                raise LkfxError(f"option '{key}' of pass '{self.name}' must be in ({low}, {high}]"
                                f"{' or None (the recipe)' if optional else ''}, got {value!r}")
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
        from lkfx.modules.kernel_warehouse import convert_convs, mark_interleaved
        from lkfx.patterns.fx import FxView

        cfg, report = self.config, ctx.report
        stages = cfg["sharing"] == "stage"
        view = FxView(gm)
        nodes = view.candidates(frozenset(["conv", "linear"]))
        if stages:
            if ctx.example_inputs is None:
                raise LkfxError("pass 'kernel_warehouse' with sharing='stage' needs example_inputs=(tensor, "
                                "...) to find the stages from the graph's shapes; or give "
                                "sharing={conv: warehouse}")
            propagate_shapes(gm, ctx.example_inputs)
        else:
            names = {view.describe(n) for n in nodes}
            unknown = sorted(set(cfg["sharing"]) - names)
            if unknown:
                raise LkfxError(f"sharing names convs that are not in the graph: {unknown}; "
                                f"the convs are {sorted(names)}")

        convs = [n for n in nodes if view.kind(n) == "conv"]
        stem = convs[0] if convs else None
        chosen = {}
        for node in nodes:
            report.matched += 1
            reason = self._refusal(view, node, node is stem)
            if reason:
                report.skip(view.describe(node), reason)
            else:
                chosen[node] = view.conv(node)
        if stages:
            plan = _Planner(view, nodes, chosen, stem, cfg).plan()
        else:
            spec = Spec(cfg["budget"], cfg["cell_ratio"], cfg["reduction"] or 1 / 16, cfg["nonlocal_basis"] or 1.0)
            plan = {n: (cfg["sharing"][view.describe(n)], spec) for n in chosen}
        groups: dict[str, list] = {}
        specs: dict[str, Spec] = {}
        for node, info in chosen.items():
            if isinstance(plan[node], str):
                report.skip(view.describe(node), plan[node])
                continue
            key, spec = plan[node]
            groups.setdefault(key, []).append((node, info))
            specs[key] = spec

        before = _count(gm)
        for name, items in list(groups.items()):
            reason = self._oversized(items, specs[name])
            if reason:
                for node, _ in items:
                    report.skip(view.describe(node), f"warehouse {name}: {reason}")
                del groups[name]
        for name, items in groups.items():
            spec = specs[name]
            kws = convert_convs([info for _, info in items], spec.budget, spec.cell_ratio, spec.reduction,
                                spec.nonlocal_basis)
            for (node, info), kw in zip(items, kws, strict=True):
                kw.train(info.module.training if info.module is not None else gm.training)
                view.swap(node, kw, "kw")
                report.rewritten += 1
            wh, lay = kws[0].warehouse, kws[0].warehouse.layout
            attention = sum(p.numel() for k in kws for n, p in k.named_parameters()
                            if n != "bias" and not n.startswith("warehouse."))
            report.note(f"warehouse {name}: {len(items)} convs, cells {lay.cell_out}x{lay.cell_in}, "
                        f"n={lay.n}, budget {spec.budget:g}, m={list(lay.m)}, {wh.cells.numel()} kernel + "
                        f"{attention} attention parameters: {', '.join(view.describe(n) for n, _ in items)}")
        if not report.modified:
            return gm
        gm = view.finish()
        mark_interleaved(gm)
        after = _count(gm)
        report.note(f"{len(groups)} warehouses at budget {cfg['budget']:g}; parameters {before} -> {after} "
                    f"({after / before:.1%})")
        return gm

    def _oversized(self, items: list, spec: Spec) -> str | None:
        """Why a warehouse is not built: no cell left, or attentions over max_attention times its cells."""
        from lkfx.modules.kernel_warehouse import layout

        try:
            lay = layout([tuple(info.weight.shape) for _, info in items], spec.budget, spec.cell_ratio)
        except ValueError as e:
            return str(e)
        cells = lay.n * lay.cell_out * lay.cell_in
        attention = _attention([info for _, info in items], lay, spec)
        limit = self.config["max_attention"]
        if attention <= limit * cells:
            return None
        channels = sorted({c for _, info in items for c in info.weight.shape[:2]})
        return (f"its cells would be {lay.cell_out}x{lay.cell_in} (gcd of the channel counts {channels}), "
                f"its attentions {attention} parameters: over max_attention={limit:g} times "
                f"its {cells} cell parameters; split it with sharing={{conv: warehouse}} or exclude convs")

    def _refusal(self, view: Any, node: Any, stem: bool) -> str | None:
        cfg, where = self.config, view.describe(node)
        if stem and STEM in cfg["exclude"]:
            return "the stem (the graph's first conv) stays static, as in the paper; exclude=() converts it"
        hit = next((p for p in cfg["exclude"] if p != STEM and re.search(p, where)), None)
        if hit is not None:
            return f"excluded by {hit!r}"
        if cfg["sharing"] != "stage" and where not in cfg["sharing"]:
            return "not named in the sharing mapping"
        if view.kind(node) == "conv":
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
        if cfg["sharing"] == "stage" and (_shape(_input(view, node)) is None or _shape(node) is None):
            return "no shape recorded for it on the example inputs"
        return None


def _attention(infos: list, lay: Any, spec: Spec) -> int:
    from lkfx.modules.kernel_warehouse import attention_parameters

    return sum(attention_parameters(lay, i, info.weight.shape[1] * info.groups, spec.reduction,
                                    spec.nonlocal_basis) for i, info in enumerate(infos))


class _Planner:
    """The default grouping (see the module docstring): each chosen conv's (warehouse, Spec), or the reason
    it stays static."""

    def __init__(self, view: Any, nodes: list, chosen: dict, stem: Any, cfg: dict):
        self.view, self.chosen, self.stem, self.cfg = view, chosen, stem, cfg
        self.convs = set(nodes)
        self.pos = {n: i for i, n in enumerate(view.gm.graph.nodes)}
        self.cut = _cut_nodes(view.gm.graph)
        self.cut_order = sorted(self.cut, key=self.pos.get)
        self.infos = {n: view.conv(n) for n in nodes if _shape(n) is not None and _shape(_input(view, n))}
        self.role = {n: self._role(n, info) for n, info in self.infos.items() if info.weight is not None}
        self.classifier = nodes[-1] if nodes and self.role.get(nodes[-1]) == "pooled" else None

    def _role(self, node: Any, info: Any) -> str:
        size = _shape(_input(self.view, node))
        if info.kind == "linear":
            return "pw" if len(size) > 2 else "pooled"
        if math.prod(size[2:]) == 1:
            return "pooled"
        if info.groups > 1:
            return "dw" if info.weight.shape[1] == 1 else "grouped"
        return "pw" if all(k == 1 for k in info.weight.shape[2:]) else "conv"

    def _source(self, node: Any, stops: set) -> Any:
        """Walk back from `node`'s input through single-input ops to the first node in `stops` or with
        several inputs."""
        x = _input(self.view, node)
        while x not in stops:
            inputs = [a for a in x.all_input_nodes if a.op != "get_attr"]
            if len(inputs) != 1:
                break
            x = inputs[0]
        return x

    def _blocks(self) -> list[tuple[list, Any, Any]]:
        """(member convs, the block's input cut or None on the chain, output shape), in graph order."""
        maps = [n for n in self.role if self.role[n] != "pooled" and n is not self.stem]
        ends = [self.pos[c] for c in self.cut_order]
        regions: dict[Any, list] = {}
        chain: dict[Any, list] = {}
        for n in maps:
            if n in self.cut:
                chain.setdefault(n, []).append(n)
            else:
                i = bisect.bisect(ends, self.pos[n])
                regions.setdefault((self.cut_order[i - 1] if i else None, self.cut_order[i]), []).append(n)
        for d in [n for n in chain if self.role[n] == "dw"]:
            feeds = self._source(d, self.convs)
            if feeds in chain and self.role[feeds] == "pw" and len(chain[feeds]) == 1:
                chain[d] = chain.pop(feeds) + chain[d]
            project = next((q for q in chain if self.role[q] == "pw" and len(chain[q]) == 1
                            and self._source(q, self.convs) is d), None)
            if project is not None:
                chain[d] += chain.pop(project)
        blocks = [(members, start, _shape(end), self.pos[end]) for (start, end), members in regions.items()]
        blocks += [(members, None, _nchw(self.infos[members[-1]], members[-1]), self.pos[members[-1]])
                   for members in chain.values()]
        blocks.sort(key=lambda b: b[3])
        return [b[:3] for b in blocks]

    def _stages(self) -> dict:
        """Each structural conv's stage: rows of blocks with the same output width and size, each row's
        first block handed over."""
        stage: dict = {}
        current, count, width, opened = None, 0, None, True
        for members, start, shape in self._blocks():
            w = None if shape is None else shape[1:]
            if w != width:  # a new row: its first block goes to the stage so far, if any
                if width is not None:
                    handed = members if start is None else \
                        [n for n in members if self._source(n, self.convs | {start}) is start]
                    stage.update({n: current for n in handed})
                    members = [n for n in members if n not in handed]
                width, opened = w, False
            if members and not opened:  # the row's own stage opens with its first conv not handed over
                current, count, opened = count, count + 1, True
            stage.update({n: current for n in members})
        return stage

    def plan(self) -> dict:
        cfg, b = self.cfg, self.cfg["budget"]
        stage = self._stages()
        last = max((s for s in stage.values() if s is not None), default=0)
        depthwise = {stage[n] for n in stage if self.role[n] == "dw"}
        separable = bool(depthwise) and b < 1
        expanders = {self._source(n, self.convs) for n in self.role if self.role[n] == "dw"}
        split = b != 1

        def spec(budget: float, ratio: float | tuple[float, float]) -> Spec:
            return Spec(budget, ratio if cfg["cell_ratio"] is None else cfg["cell_ratio"],
                        cfg["reduction"] or (1 / 32 if separable else 1 / 16), cfg["nonlocal_basis"] or 1.0)

        plan: dict = {}
        for node in self.chosen:
            role = self.role.get(node)
            if node is self.stem:
                plan[node] = ("stem", spec(1.0, 1.0) if separable else spec(b, 1.0 if b >= 1 else 0.5))
            elif role == "pooled":
                plan[node] = ("classifier", spec(b, (1.0, CLASSIFIER_CELL_IN))) if separable and \
                    node is self.classifier else "it reads pooled 1 x 1 features (squeeze-excitation, " \
                    "classifier): static, as in the paper"
            elif node not in stage:
                plan[node] = "no stage found for it"
            elif role in ("dw", "grouped"):
                plan[node] = (f"stage{stage[node]}_{role}", spec(1.0, 1.0) if separable else
                              spec(b, 1.0 if b >= 1 else 0.5))
            elif separable and stage[node] != last:
                plan[node] = ("below 1x the official recipe for networks with depthwise convs keeps the "
                              "pointwise and dense convs of all stages but the last static")
            else:
                s = stage[node]
                kind = "" if s not in depthwise else "_conv" if role == "conv" else \
                    "_pw" if not split else "_expand" if node in expanders else "_project"
                plan[node] = (f"stage{s}{kind}", spec(b, 1.0 if b >= 1 else 0.5))
        if b < 1 and not depthwise and cfg["nonlocal_basis"] is None:
            plan = self._with_basis(plan)
        return plan

    def _with_basis(self, plan: dict) -> dict:
        """Below 1x without depthwise convs: the nonlocal basis 1/16 everywhere when the attentions would
        otherwise hold over half the cells' parameters (official ResNet50 1/2x)."""
        from lkfx.modules.kernel_warehouse import layout

        groups: dict[str, list] = {}
        for node, item in plan.items():
            if not isinstance(item, str):
                groups.setdefault(item[0], []).append(node)
        cells = attention = 0
        for members in groups.values():
            spec = plan[members[0]][1]
            infos = [self.chosen[n] for n in members]
            try:
                lay = layout([tuple(i.weight.shape) for i in infos], spec.budget, spec.cell_ratio)
            except ValueError:
                continue
            cells += lay.n * lay.cell_out * lay.cell_in
            attention += _attention(infos, lay, spec)
        if attention <= cells / 2:
            return plan
        return {n: item if isinstance(item, str) else
                (item[0], Spec(item[1].budget, item[1].cell_ratio, item[1].reduction, 1 / 16))
                for n, item in plan.items()}


def _input(view: Any, node: Any) -> Any:
    return view.arg(node, "input") if node.op == "call_function" else node.args[0]


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _nchw(info: Any, node: Any) -> tuple[int, ...]:
    """Output shape of a conv, or of a Linear over channels-last maps with its channels moved to dim 1."""
    shape = _shape(node)
    return (shape[0], shape[-1], *shape[1:-1]) if info.kind == "linear" else shape


def _count(gm: Any) -> int:
    return sum(p.numel() for p in gm.parameters())


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
