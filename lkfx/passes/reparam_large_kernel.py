"""reparam_large_kernel: swap depthwise convs for RepLKNet-style large-kernel reparameterisable blocks (FX).

    x ── DWConv kxk (W, b) ── y      becomes      x ─┬─ DW KxK ── BN ─┐
                                                     └─ DW 5x5 ── BN ─┴─ + ── y

Candidates are depthwise convs (``groups == in == out channels``), 2-D, stride 1 or 2, zero 'same' padding of an
odd kernel (``padding = d (k - 1) / 2``, or ``'same'``), module or functional. Selected by ``min_kernel`` (the
largest side must be at least this), ``name`` (a regular expression searched in the module path / node name)
and ``kernel_size``: one odd size, or a list with one per stage, RepLKNet's ``[31, 29, 27, 13]``, where stages
are the feature-map sizes of the candidates, largest first (a list needs ``example_inputs``). A conv already as
large as its target is left alone. ``small_kernels`` (ints or (kernel, dilation) pairs) and ``dilated``
(UniRepLKNet's dilated set instead) choose the parallel branches: see `lkfx.modules.replk`.

``init='preserve'`` (default): the block is `ReparamLargeKernelConv.preserving` the conv: the old kernel
(dilated to dense if it had a dilation) zero-padded into the centre of the large one, the large branch's BN the
identity on the conv's output statistics (measured on ``example_inputs`` when given, else mean 0 / variance 1)
plus the old bias, the small branches' BNs with ``gamma = beta = 0``. So at swap time, in eval mode, the model
computes exactly what it did (max relative error <= 1e-5): the pass is exact in that sense, and fine-tuning
starts from the pretrained function. ``init='random'`` keeps PyTorch's default initialisation (not exact).

Every candidate is in the report: swapped (with its old and new kernel and stage) or skipped with the reason.
`merge_reparam` turns the blocks back into single KxK depthwise convs for deployment.
"""

from __future__ import annotations

import re
from typing import Any

from lkfx.errors import LkfxError
from lkfx.passes import Pass, PassContext, register_pass


def _kernel_sizes(value: Any) -> int | tuple[int, ...]:
    sizes = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(sizes, (list, tuple)) or not sizes or \
            not all(isinstance(k, int) and not isinstance(k, bool) and k >= 3 and k % 2 for k in sizes):
        raise LkfxError(f"option 'kernel_size' of pass 'reparam_large_kernel' must be an odd int >= 3 or a list of "
                        f"them (one per stage), got {value!r}")
    return value if isinstance(value, int) else tuple(value)


@register_pass
class ReparamLargeKernel(Pass):
    name = "reparam_large_kernel"
    summary = "Swap depthwise convs for large-kernel + small-kernel reparameterisable blocks (RepLKNet)."
    options = {"kernel_size": 31, "small_kernels": (5,), "dilated": False, "min_kernel": 5, "name": "",
               "init": "preserve"}
    def __init__(self, **options: Any):
        sizes = options.pop("kernel_size", self.options["kernel_size"])
        super().__init__(**options)
        self.config["kernel_size"] = _kernel_sizes(sizes)
        if self.config["init"] not in ("preserve", "random"):
            raise LkfxError(f"option 'init' of pass '{self.name}' must be 'preserve' or 'random', "
                            f"got {self.config['init']!r}")
        from lkfx.modules.replk import branches_for

        try:
            branches_for(31, self.config["small_kernels"])
        except (TypeError, ValueError) as e:
            raise LkfxError(f"option 'small_kernels' of pass '{self.name}': {e}") from e

    def fx_leaf_modules(self, model: Any) -> tuple[type, ...]:
        from lkfx.modules.replk import ReparamLargeKernelConv

        return (ReparamLargeKernelConv,)  # do not swap the branches of blocks already there

    def run_fx(self, gm: Any, ctx: PassContext) -> Any:
        from lkfx.modules.replk import ReparamLargeKernelConv
        from lkfx.patterns.fx import FxView

        view = FxView(gm)
        cfg = self.config
        report = ctx.report
        chosen = []  # (node, info, dense kernel)
        for node in view.candidates(frozenset(["conv"])):
            computed = view.computed_conv_args(node)
            if computed:
                report.matched += 1
                report.skip(view.describe(node), f"its {', '.join(computed)} computed in the graph")
                continue
            info = view.conv(node)
            w = info.weight
            if w is None or w.shape[1] != 1 or info.groups != w.shape[0]:
                continue  # not depthwise (or weight computed: cannot tell)
            report.matched += 1
            where = view.describe(node)
            reason = self._refusal(view, info, where)
            if reason:
                report.skip(where, reason)
                continue
            dense = tuple((k - 1) * d + 1 for k, d in zip(w.shape[2:], info.dilation, strict=True))
            chosen.append((node, info, dense))

        stats = _output_stats(gm, [n for n, _, _ in chosen], ctx.example_inputs) if ctx.example_inputs else {}
        targets = self._targets(chosen, stats)
        for (node, info, dense), (target, stage) in zip(chosen, targets, strict=True):
            where = view.describe(node)
            if max(dense) >= target:
                report.skip(where, f"its {'x'.join(map(str, dense))} kernel is not smaller than the target "
                                   f"{target}x{target}")
                continue
            block_kw = {"stride": info.stride[0], "small_kernels": cfg["small_kernels"], "dilated": cfg["dilated"]}
            if cfg["init"] == "preserve":
                mean_var = None
                if node in stats:
                    _, mean, var = stats[node]
                    if info.bias is not None:
                        mean = mean - info.bias.detach().double().cpu()
                    mean_var = (mean.to(info.weight.dtype), var.to(info.weight.dtype))
                block = ReparamLargeKernelConv.preserving(info.weight, info.bias, target, dilation=info.dilation,
                                                          stats=mean_var, **block_kw)
            else:
                block = ReparamLargeKernelConv(info.weight.shape[0], target, **block_kw).to(
                    device=info.weight.device, dtype=info.weight.dtype)
            block.train(info.module.training if info.module is not None else gm.training)
            view.swap(node, block, "replk")
            old = "x".join(map(str, info.weight.shape[2:]))
            small = ", ".join(f"{k}x{k}" + (f" d{d}" if d > 1 else "") for k, d in block.branches)
            stage = "" if stage is None else f", stage {stage}"
            report.note(f"{where}: {old} -> {target}x{target} + [{small}] ({cfg['init']} init{stage})")
            report.rewritten += 1
        return view.finish() if report.modified else gm

    def _refusal(self, view: Any, info: Any, where: str) -> str | None:
        cfg = self.config
        w = info.weight
        if w.ndim != 4:
            return f"only 2-D depthwise convs are swapped, this one is {w.ndim - 2}-D"
        if cfg["name"] and not re.search(cfg["name"], where):
            return f"name does not match {cfg['name']!r}"
        if max(w.shape[2:]) < cfg["min_kernel"]:
            return f"kernel {'x'.join(map(str, w.shape[2:]))} is below min_kernel={cfg['min_kernel']}"
        if view.bias_is_computed(info):
            return "the bias is computed in the graph, not a parameter"
        if info.stride not in ((1, 1), (2, 2)):
            return f"stride {info.stride}: only 1 or 2 (the same in both dims) is supported"
        if info.padding_mode != "zeros":
            return f"padding mode '{info.padding_mode}': only zero padding keeps the swap exact"
        if any(k % 2 == 0 for k in w.shape[2:]):
            return f"even kernel {tuple(w.shape[2:])} cannot be centred in an odd large kernel"
        same = tuple(d * (k - 1) // 2 for k, d in zip(w.shape[2:], info.dilation, strict=True))
        if info.padding != "same" and tuple(info.padding) != same:
            return f"padding {info.padding} is not 'same' ({same})"
        shared = view.weight_shared_with(info)
        if shared:
            return f"weight shared ({shared}); swapping one use would untie it"
        return None

    def _targets(self, chosen: list, stats: dict) -> list[tuple[int, int | None]]:
        """(kernel size, stage or None) for each chosen conv."""
        sizes = self.config["kernel_size"]
        if isinstance(sizes, int):
            return [(sizes, None)] * len(chosen)
        if not chosen:
            return []
        if not stats:
            raise LkfxError("a per-stage kernel_size list needs example_inputs: stages are told apart by the "
                            "feature-map size of each depthwise conv")
        areas = sorted({stats[n][0][0] * stats[n][0][1] for n, _, _ in chosen}, reverse=True)
        if len(areas) != len(sizes):
            raise LkfxError(f"kernel_size lists {len(sizes)} stages but the selected depthwise convs work on "
                            f"{len(areas)} feature-map sizes; give {len(areas)} kernel sizes")
        stages = [areas.index(stats[n][0][0] * stats[n][0][1]) for n, _, _ in chosen]
        return [(sizes[i], i) for i in stages]


def _output_stats(gm: Any, nodes: list, example_inputs: tuple) -> dict:
    """{node: ((H, W), mean, var)} of each node's output on the example inputs, per channel, float64."""
    import torch.fx as fx

    from lkfx.graph.fx import buffers_restored

    wanted = set(nodes)
    seen: dict = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                y = out.detach().double().cpu()
                seen[n] = (tuple(y.shape[2:]), y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False))
            return out

    with buffers_restored(gm):
        Recorder(gm).run(*example_inputs)
    return seen
