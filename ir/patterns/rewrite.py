"""A small rewrite driver: rules of match → check → rewrite, applied over a graph to a fixpoint.

A `Rule` has three parts. `match(node)` recognizes the structure the rule is about and returns
what the rewrite needs (None: not this rule's structure, nothing to say). `check(match)` decides
whether the target can take it, and returns the reason when it cannot: every such failed match is
kept, so a pass can say why it left a structure it was meant for as written (a remark).
`rewrite(match)` changes the graph and returns whether it did.

`apply_rules` walks the graph in order, tries the rules on each node (the first exclusive rule that
rewrites a node ends its turn), and repeats while a round rewrote something. The failed matches reported are those of
the last round, so a structure a later round rewrote is not reported as missed.

Why not onnxscript's rewriter (`onnxscript.rewriter.pattern`), which works on the same onnx-ir
objects: its replacement owns the names of the nodes and values it creates and tags each node
with its rule's name in `metadata_props`, so optc's lowerings would no longer write byte-identical
files; and optc's rewrites are not all pattern-to-subgraph replacements (a Q/DQ pair re-encoded for
all its readers, an initializer changed in place, a zero point shared between rewrites).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from optc.ir.core import Graph, Node


@dataclass(frozen=True)
class Rule:
    """One rewrite: `match` the structure, `check` it (None, or why it cannot be rewritten), `rewrite` it.

    `exclusive=False` lets the rules after it still try a node it rewrote (a preparing step, such as
    putting a weight in the form the next rule takes).
    """

    name: str
    match: Callable[[Node], Any]
    rewrite: Callable[[Any], bool]
    check: Callable[[Any], str | None] | None = None
    exclusive: bool = True


@dataclass(frozen=True)
class Miss:
    """A structure a rule matched but could not rewrite, and why."""

    rule: str
    node: Node
    reason: str


@dataclass
class RewriteResult:
    """What `apply_rules` did: rewrites per rule, the failed matches of the last round, and the rounds run."""

    applied: dict[str, int] = field(default_factory=dict)
    misses: list[Miss] = field(default_factory=list)
    rounds: int = 0

    @property
    def total(self) -> int:
        return sum(self.applied.values())

    def reasons(self, rule: str | None = None) -> list[str]:
        """The reasons of the failed matches (of one rule, or all), in graph order."""
        return [m.reason for m in self.misses if rule is None or m.rule == rule]


def apply_rules(graph: Graph | Callable[[], Iterable[Node]], rules: Sequence[Rule], *, fixpoint: bool = True,
                max_rounds: int = 16) -> RewriteResult:
    """Apply `rules` to every node of `graph` (a graph, or a function listing the nodes to visit), in order.

    With `fixpoint`, rounds repeat until one rewrites nothing (at most `max_rounds`, a guard against
    rules that undo each other).
    """
    nodes = (lambda: list(graph)) if isinstance(graph, Graph) else (lambda: list(graph()))
    result = RewriteResult()
    while True:
        result.rounds += 1
        misses: list[Miss] = []
        changed = False
        for node in nodes():
            for rule in rules:
                found = rule.match(node)
                if found is None:
                    continue
                reason = rule.check(found) if rule.check is not None else None
                if reason:
                    misses.append(Miss(rule.name, node, reason))
                    continue
                if rule.rewrite(found):
                    result.applied[rule.name] = result.applied.get(rule.name, 0) + 1
                    changed = True
                    if rule.exclusive:
                        break
        result.misses = misses
        if not fixpoint or not changed or result.rounds >= max_rounds:
            return result


__all__ = ["Miss", "RewriteResult", "Rule", "apply_rules"]
