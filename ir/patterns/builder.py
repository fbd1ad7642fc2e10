"""An IR builder that owns fresh names: one per pass run, so naming does not scan the graph each time.

`optc.ir.unique_name(graph, base)` collects every value name of the graph on each call. A `Builder`
collects them once, then keeps the set current as it hands names out: `fresh(base)` returns the
name `unique_name` would (base, else base_1, base_2...) and reserves it. Names stay exactly what
`unique_name` gives as long as the pass tells the builder about what it removes or renames
outside it (`release`, `rename`).

`drop_unused_initializers` is the one sweep of initializers nothing reads that passes run after a
rewrite (the `dce` pass removes dead nodes too).

Node names are not values: as `unique_name` always had it, `node_name(base)` avoids the value
names but reserves nothing, so a node and its output may share a name.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from optc.ir.core import Graph, Node, Tensor, Value, add_initializer, make_node
from optc.ir.spill import attached


class Builder:
    """Creates initializers and nodes in `graph` under fresh value names."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._taken: set[str] = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        self._taken |= {o.name for n in graph for o in n.outputs if o.name}

    @classmethod
    def of(cls, target: Graph | Builder) -> Builder:
        """`target` itself when it is a builder, else a new one for the graph (for helpers callers pass either)."""
        return target if isinstance(target, Builder) else cls(target)

    def _free(self, base: str) -> str:
        if base not in self._taken:
            return base
        i = 1
        while f"{base}_{i}" in self._taken:
            i += 1
        return f"{base}_{i}"

    def fresh(self, base: str) -> str:
        """A value name no value of the graph has, derived from `base`; reserved from now on."""
        name = self._free(base)
        self._taken.add(name)
        return name

    def node_name(self, base: str) -> str:
        """A node name derived from `base` that no value has (nothing is reserved)."""
        return self._free(base)

    def taken(self, name: str) -> bool:
        return name in self._taken

    def release(self, names: str | Iterable[str | None]) -> None:
        """Names of values the pass removed from the graph: free again."""
        for name in (names,) if isinstance(names, str) else names:
            if name:
                self._taken.discard(name)

    def reserve(self, names: str | Iterable[str | None]) -> None:
        """Names the pass gave values without the builder."""
        for name in (names,) if isinstance(names, str) else names:
            if name:
                self._taken.add(name)

    def rename(self, value: Value, base: str) -> str:
        """Give `value` a fresh name derived from `base`; its old name is free again. Returns the new name."""
        old = value.name
        value.name = self.fresh(base)
        if old and old != value.name:
            self.release(old)
        return value.name

    def initializer(self, base: str, array: np.ndarray | Tensor) -> Value:
        """A new initializer named fresh from `base` (moved to the graph's spill file at once when one is attached)."""
        value = add_initializer(self.graph, self.fresh(base), array)
        spill = attached(self.graph)
        if spill is not None:
            spill.spill_value(value)
        return value

    def node(
        self,
        op_type: str,
        inputs: Iterable[Value | None],
        *,
        name: str | None = None,
        outputs: Sequence[str] = (),
        attributes: dict[str, object] | None = None,
        domain: str = "",
        num_outputs: int = 1,
    ) -> Node:
        """A node (not yet in the graph) named from `name`, its outputs named fresh from `outputs`."""
        node_name = self.node_name(name) if name is not None else None
        return make_node(op_type, inputs, attributes=attributes, num_outputs=num_outputs, name=node_name,
                         domain=domain, output_names=[self.fresh(base) for base in outputs])


def drop_unused_initializers(graph: Graph, among: Iterable[Value] | None = None) -> list[str]:
    """Remove the initializers no node reads that are neither graph inputs nor outputs; returns their names.

    `among` restricts the sweep to those values (a pass removing only what it left unused); a value
    counts only while it is still the graph's initializer of its name.
    """
    if among is None:
        candidates = list(graph.initializers.items())
    else:
        candidates = [(v.name, v) for v in among if v.name in graph.initializers and graph.initializers[v.name] is v]
    dead: list[str] = []
    for name, value in candidates:
        if name in dead or value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        dead.append(name)
    for name in dead:
        graph.initializers.pop(name)
    return dead


__all__ = ["Builder", "drop_unused_initializers"]
