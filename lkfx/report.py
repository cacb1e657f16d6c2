"""What each pass did: matched, rewritten, skipped (with the reason), seconds.

`str(report)` is a table for people; `report.to_dict()` is JSON-ready for machines (`--report FILE.json`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Skip:
    where: str
    reason: str
    node: str = ""  # the node the pass is about (fold_bn: the BatchNorm), so that they can be counted


@dataclass
class PassReport:
    name: str
    frontend: str
    matched: int = 0
    rewritten: int = 0
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def modified(self) -> bool:
        return self.rewritten > 0

    def skip(self, where: str, reason: str, node: str = "") -> None:
        self.skipped.append(Skip(where, reason, node))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "frontend": self.frontend,
            "matched": self.matched,
            "rewritten": self.rewritten,
            "modified": self.modified,
            "skipped": [{"where": s.where, "reason": s.reason} | ({"node": s.node} if s.node else {})
                        for s in self.skipped],
            "notes": list(self.notes),
            "seconds": round(self.seconds, 6),
        }


@dataclass
class Report:
    frontend: str
    passes: list[PassReport] = field(default_factory=list)
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return any(p.modified for p in self.passes)

    def __getitem__(self, name: str) -> PassReport:
        for p in self.passes:
            if p.name == name:
                return p
        raise KeyError(f"no pass named {name!r} in this report; passes: {[p.name for p in self.passes]}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "frontend": self.frontend,
            "modified": self.modified,
            "passes": [p.to_dict() for p in self.passes],
            "before": dict(self.before),
            "after": dict(self.after),
            "check": self.check,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        out = [self.summary()]
        for p in self.passes:
            for s in p.skipped:
                out.append(f"  [{p.name}] skipped {s.where}: {s.reason}")
            for n in p.notes:
                out.append(f"  [{p.name}] {n}")
        out.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(out)

    def summary(self) -> str:
        """The table of counts per pass, the before -> after statistics and the check's error."""
        rows = [("pass", "matched", "rewritten", "skipped", "seconds")]
        rows += [(p.name, str(p.matched), str(p.rewritten), str(len(p.skipped)), f"{p.seconds:.3f}")
                 for p in self.passes]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        line = "  ".join("-" * w for w in widths)

        def fmt(row: tuple[str, ...]) -> str:
            cells = zip(row, widths, strict=True)
            return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

        out = [f"lkfx report ({self.frontend})", fmt(rows[0]), line, *map(fmt, rows[1:])]
        for key in sorted(set(self.before) | set(self.after)):
            out.append(f"{key}: {self.before.get(key, '?')} -> {self.after.get(key, '?')}")
        if self.check is not None:
            c = self.check
            out.append(f"check: max relative error {c['max_rel_error']:.3g} (tolerance {c['tolerance']:g})")
            verdict = "passed" if c["passed"] else "failed"
            if "rewritten_float64_error" in c:
                out.append(f"check: from a float64 run of the original: original {c['original_error']:.3g}, "
                           f"rewritten {c['rewritten_error']:.3g}, rewritten run in float64 "
                           f"{c['rewritten_float64_error']:.3g} ({verdict}: fails beyond the original's, plus the "
                           "tolerance)")
            elif "original_error" in c:
                out.append(f"check: from a float64 run of the original: original {c['original_error']:.3g}, "
                           f"rewritten {c['rewritten_error']:.3g} ({verdict}: fails beyond twice the original's, "
                           "plus the tolerance)")
            if "note" in c:
                out.append(f"check: {c['note']}")
        return "\n".join(out)
