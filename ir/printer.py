"""Deterministic text form of the IR, for golden tests and `--print-ir-after-change`.

The text is ONNX's textual syntax (`onnx.printer` / `onnx.parser`) followed by
optc's annotations as comment lines that `parse_text` reads back:

    # @node mm quant={"bits":4}
    # @value w source_name="model.layers.0.q_proj.weight"

Nodes are named by their name, else by `%` and their first output.
Initializers larger than `max_elements` are elided to a typed declaration
(`<float[4096,4096] w>`) so large models print quickly; such text is for
reading, not for parsing back.
"""

from __future__ import annotations

import json

import onnx
import onnx.parser
import onnx.printer

from optc.ir.core import Model, Node
from optc.ir.io import from_proto, to_proto

_NODE = "# @node "
_VALUE = "# @value "


def _node_ref(node: Node) -> str:
    if node.name:
        return node.name
    first = next((o.name for o in node.outputs if o.name), "")
    return "%" + first


def print_ir(model: Model, *, max_elements: int | None = None) -> str:
    """The model as deterministic text; initializers over `max_elements` are elided."""
    proto = to_proto(model, max_elements=max_elements)
    # Printed initializers already show their type; drop their duplicate declarations.
    printed = {t.name for t in proto.graph.initializer}
    declarations = [v for v in proto.graph.value_info if v.name not in printed]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(declarations)
    # Metadata of nodes and values is printed as comments below, not by onnx.printer.
    # No trailing spaces (onnx.printer leaves some), so golden files survive editors and git hooks.
    lines = [line.rstrip() for line in onnx.printer.to_text(proto).rstrip("\n").splitlines()]
    for node in model.graph.all_nodes():  # subgraph (If/Loop body) nodes too
        for key, raw in sorted(node.metadata_props.items()):
            lines.append(f"{_NODE}{_node_ref(node)} {key.removeprefix('optc.')}={raw}")
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    values += [o for n in model.graph.all_nodes() for o in n.outputs]
    seen: set[int] = set()
    for value in values:
        if id(value) in seen:
            continue
        seen.add(id(value))
        for key, raw in sorted(value.metadata_props.items()):
            lines.append(f"{_VALUE}{value.name} {key.removeprefix('optc.')}={raw}")
    return "\n".join(lines) + "\n"


def parse_text(text: str) -> Model:
    """Parse the text form (ONNX textual syntax plus annotation comments) into a model."""
    proto = onnx.parser.parse_model(text)
    model = from_proto(proto)
    nodes = {_node_ref(n): n for n in model.graph.all_nodes()}
    values = {v.name: v for v in model.graph.inputs}
    values.update(model.graph.initializers)
    values.update({o.name: o for n in model.graph.all_nodes() for o in n.outputs})
    for line in text.splitlines():
        line = line.strip()
        for prefix, table in ((_NODE, nodes), (_VALUE, values)):
            if line.startswith(prefix):
                ref, _, assignment = line[len(prefix):].partition(" ")
                key, _, raw = assignment.partition("=")
                if ref not in table:
                    raise ValueError(f"annotation names unknown {prefix[3:].strip()} {ref!r}")
                json.loads(raw)  # annotations must be valid JSON
                table[ref].metadata_props["optc." + key] = raw
    return model
