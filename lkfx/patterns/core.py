"""The pattern language shared by the torch.fx and ONNX matchers.

A `Pattern` describes a node by its op kind(s), an optional predicate on the node, and patterns for the nodes
producing its data inputs (``None`` = anything). Binding a name records the matched node in the `Match`.
A `Rule` is pattern + check + rewrite: the check returns ``None`` to accept or a reason string to refuse,
and the reason goes into the pass report.

Matching is anchored: the frontend keeps an index from op kind to nodes, only nodes of the root pattern's kinds
are tried, and each try walks the pattern tree once — linear in the number of candidate nodes.

    conv_bn = Pattern("batch_norm", inputs=[Pattern("conv", bind="conv")], bind="bn")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from lkfx.report import PassReport

Node = Any


class GraphView(Protocol):
    """What a frontend offers the matcher."""

    def candidates(self, kinds: frozenset[str]) -> list[Node]: ...

    def kind(self, node: Node) -> str | None: ...

    def input_node(self, node: Node, index: int) -> Node | None: ...

    def alive(self, node: Node) -> bool: ...

    def describe(self, node: Node) -> str: ...


@dataclass(frozen=True)
class Pattern:
    kinds: frozenset[str]
    inputs: tuple[Pattern | None, ...] = ()
    bind: str | None = None
    where: Callable[[Node], bool] | None = None

    def __init__(
        self,
        kinds: str | Iterable[str],
        inputs: Iterable[Pattern | None] = (),
        bind: str | None = None,
        where: Callable[[Node], bool] | None = None,
    ):
        object.__setattr__(self, "kinds", frozenset([kinds] if isinstance(kinds, str) else kinds))
        object.__setattr__(self, "inputs", tuple(inputs))
        object.__setattr__(self, "bind", bind)
        object.__setattr__(self, "where", where)


Match = dict[str, Node]


def _match(view: GraphView, pattern: Pattern, node: Node | None, out: Match) -> bool:
    if node is None or view.kind(node) not in pattern.kinds:
        return False
    if pattern.where is not None and not pattern.where(node):
        return False
    if pattern.bind is not None:
        if pattern.bind in out and out[pattern.bind] is not node:
            return False
        out[pattern.bind] = node
    for i, sub in enumerate(pattern.inputs):
        if sub is not None and not _match(view, sub, view.input_node(node, i), out):
            return False
    return True


def find(view: GraphView, pattern: Pattern) -> Iterator[Match]:
    """Yield every match of `pattern`, rooted at candidate nodes, in graph order."""
    for node in view.candidates(pattern.kinds):
        if not view.alive(node):
            continue
        m: Match = {}
        if _match(view, pattern, node, m):
            yield m


@dataclass
class Rule:
    """pattern + check (None or a reason) + rewrite. `where` names the match in the report; `subject` names the
    node of the match the pass is about (recorded with a refusal, so that a pass can account for each one)."""

    name: str
    pattern: Pattern
    check: Callable[[Match], str | None]
    rewrite: Callable[[Match], str | None]
    where: Callable[[Match], str] = field(default=lambda m: "")
    subject: Callable[[Match], str] = field(default=lambda m: "")


def apply_rules(view: GraphView, rules: Iterable[Rule], report: PassReport) -> int:
    """Run each rule over the graph until it rewrites nothing more; count matches, rewrites and refusals in `report`.

    A rewrite can make a new match (conv -> BN -> BN: folding the first BN puts the second next to the conv), so a
    rule runs again after a round that rewrote something; rewrites must remove a node of their match, which ends
    the loop. A refused match is counted once. A rewrite may return a note (e.g. "folded into a copy of a shared
    weight") that is added to the report. Matches whose nodes an earlier rewrite removed are not counted.
    """
    done = 0
    refused: dict[tuple[int, ...], Match] = {}  # by node ids; the match is kept so its ids stay unique
    for rule in rules:
        rewrote = True
        while rewrote:
            rewrote = False
            for m in list(find(view, rule.pattern)):
                key = tuple(id(n) for n in m.values())
                if key in refused or not all(view.alive(n) for n in m.values()):
                    continue
                report.matched += 1
                where = rule.where(m) or ", ".join(view.describe(n) for n in m.values())
                reason = rule.check(m)
                if reason is not None:
                    report.skip(where, f"{rule.name}: {reason}", rule.subject(m))
                    refused[key] = m
                    continue
                note = rule.rewrite(m)
                if note:
                    report.note(f"{where}: {note}")
                report.rewritten += 1
                done += 1
                rewrote = True
    return done
