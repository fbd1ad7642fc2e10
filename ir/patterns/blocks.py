"""The block partition of a decoder: the residual stream cut between consecutive decoder layers.

A decoder computes `h₀ = Embed(ids)` and then `h_{k+1} = h_k + f_k(h_k)` for each residual Add
(attention, then feed-forward, in each layer of a pre-norm Llama-family model), and a head reads
the last `h`. `find_blocks(model)` finds that chain on the graph (not on names) and cuts it into
stages that can run one after another, each as a small ONNX model of its own (`stage_model`):

* the **prefix**: the embedding Gather and everything computed from the graph inputs without the
  stream (attention mask, rotary cos/sin, position ids, shapes); it outputs `h₀` and these
  *side values*, computed once per sample;
* one **block** per decoder layer (the residual Adds grouped by the HF config's
  `num_hidden_layers` when it divides them, else one Add per block): it reads `h_b` and side
  values, and outputs `h_{b+1}`;
* the **suffix**: what reads the last `h` (final norm, head) up to the graph outputs.

Constant-only nodes (a `Constant`, the DequantizeLinear of a quantized weight, a Transpose of an
initializer) belong to no stage: each stage model takes a copy of those it reads, so a stage holds
only its own weights. The stage models share the original tensors (nothing is copied until saved).

This is what block-by-block (true-sequential) calibration runs on, as GPTQ's reference code and
llm-compressor's sequential pipeline do (Frantar et al., 2022, `llama_sequential`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from optc.ir.annotations import HF_CONFIG, model_metadata
from optc.ir.core import AttributeType, DataType, Graph, Model, Node, TensorType, Value
from optc.ir.patterns.match import ONNX_DOMAINS, is_const


@dataclass
class Stage:
    """One part of the partition: its computed nodes (graph order), what it reads and what it gives."""

    name: str
    nodes: list[Node]
    #: The stream value it reads (None for the prefix), then its side values (prefix outputs, graph inputs).
    inputs: list[Value]
    #: The stream value it writes (blocks, prefix), or the graph outputs it computes (suffix).
    outputs: list[Value]
    #: Names of every value its nodes compute.
    produces: set[str] = field(default_factory=set)


@dataclass
class BlockPartition:
    """The stages of a decoder in the order they run: prefix, blocks, suffix."""

    prefix: Stage
    blocks: list[Stage]
    suffix: Stage
    #: The residual stream between stages: stream[b] is the input of block b (len(blocks) + 1 values).
    stream: list[Value]

    @property
    def stages(self) -> list[Stage]:
        return [self.prefix, *self.blocks, self.suffix]

    def stage_of(self, name: str) -> Stage | None:
        """The stage whose run gives the value `name` (a graph input: the prefix); None for constants."""
        for stage in self.stages:
            if name in stage.produces:
                return stage
        if any(v.name == name for v in self.prefix.inputs):
            return self.prefix
        return None


def _is_computed(value: Value | None, const_nodes: set[int]) -> bool:
    if value is None or is_const(value):
        return False
    node = value.producer()
    return node is None or id(node) not in const_nodes  # a graph input, or a computed node's output


def constant_nodes(graph: Graph) -> set[int]:
    """ids of the nodes whose inputs are all constants or outputs of such nodes (weights' DequantizeLinear...)."""
    found: set[int] = set()
    for node in graph:
        if all(not _is_computed(v, found) for v in node.inputs):
            found.add(id(node))
    return found


def _embedding_output(graph: Graph, const_nodes: set[int]) -> Value | str:
    """h₀: the output of the one Gather of a constant 2-D table by computed indices."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain not in ONNX_DOMAINS or len(node.inputs) != 2:
            continue
        table, ids = node.inputs
        if table is None or _is_computed(table, const_nodes) or not _is_computed(ids, const_nodes):
            continue
        if table.shape is not None and len(table.shape) != 2:
            continue
        found.append(node.outputs[0])
    if len(found) != 1:
        return f"{len(found)} embedding Gathers of a constant table (one expected)"
    return found[0]


def _descendants(start: Value) -> set[int]:
    """ids of the nodes computed from `start`."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        value = stack.pop()
        for use in value.uses():
            node = use.node
            if id(node) not in seen:
                seen.add(id(node))
                stack.extend(node.outputs)
    return seen


def _residual_chain(h0: Value) -> list[Node]:
    """The residual Adds in order: each reads the previous stream value and something computed from it."""
    chain: list[Node] = []
    h = h0
    while True:
        below = _descendants(h)
        adds = [u.node for u in h.uses() if u.node.op_type == "Add" and u.node.domain in ONNX_DOMAINS
                and len(u.node.inputs) == 2 and u.node.inputs[0] is not u.node.inputs[1]
                and (other := u.node.inputs[1 - u.idx]) is not None and other.producer() is not None
                and id(other.producer()) in below]
        if len(adds) != 1:
            return chain
        chain.append(adds[0])
        h = adds[0].outputs[0]


def _layers(model: Model) -> int | None:
    """The HF config's `num_hidden_layers`, when the model carries its config."""
    config = model_metadata(model, HF_CONFIG)
    if isinstance(config, dict) and "num_hidden_layers" not in config:
        config = config.get("text_config")
    layers = config.get("num_hidden_layers") if isinstance(config, dict) else None
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else None


def find_blocks(model: Model, layers: int | None = None) -> BlockPartition | str:
    """The partition of a decoder's graph into prefix, one block per layer and suffix; else why not (one phrase).

    `layers`: the number of decoder layers, when the model does not carry its HF config yet."""
    graph = model.graph
    for node in graph:
        if any(a.type in (AttributeType.GRAPH, AttributeType.GRAPHS) for a in node.attributes.values()):
            return f"a {node.op_type} with a subgraph ({node.name})"
    const_nodes = constant_nodes(graph)
    h0 = _embedding_output(graph, const_nodes)
    if isinstance(h0, str):
        return h0
    chain = _residual_chain(h0)
    if len(chain) < 2:
        return "no residual stream of Adds after the embedding"
    layers = layers if layers is not None else _layers(model)
    per = len(chain) // layers if layers and len(chain) % layers == 0 else 1
    ends = chain[per - 1::per]
    stream = [h0, *(add.outputs[0] for add in ends)]
    level_of_stream = {id(v): i for i, v in enumerate(stream)}
    # Level of each computed value: 0..len(ends) from the stream values it depends on; -1 for the prefix.
    level: dict[int, int] = {}
    node_level: dict[int, int] = {}
    stage_nodes: dict[int, list[Node]] = {}
    for node in graph:
        if id(node) in const_nodes:
            continue
        lv = -1
        for v in node.inputs:
            if v is not None and id(v) in level:
                lv = max(lv, level[id(v)])
        if node.outputs and node.outputs[0] is h0:
            lv = -1
        node_level[id(node)] = lv
        stage_nodes.setdefault(lv, []).append(node)
        for out in node.outputs:
            level[id(out)] = level_of_stream.get(id(out), lv)
        if node.outputs and node.outputs[0] is h0:
            level[id(h0)] = 0
    blocks_n = len(ends)
    # Each stage may read: its stream value, prefix values and graph inputs, its own values.
    prefix_values: list[Value] = []
    stages: list[Stage] = []
    for lv in range(-1, blocks_n + 1):
        nodes = stage_nodes.get(lv, [])
        produces = {o.name for n in nodes for o in n.outputs}
        inputs: list[Value] = [] if lv < 0 else [stream[lv]]
        for node in nodes:
            for v in node.inputs:
                if not _is_computed(v, const_nodes) or v.name in produces or any(v is i for i in inputs):
                    continue
                owner = v.producer()
                if lv >= 0 and owner is not None and node_level.get(id(owner), -1) >= 0:
                    return f"{node.op_type} ({node.name}) reads {v.name!r} of an earlier layer, not the residual stream"
                inputs.append(v)
                if lv >= 0 and owner is not None and not any(v is p for p in prefix_values):
                    prefix_values.append(v)
        if lv < 0:
            outputs = [h0]
        elif lv < blocks_n:
            outputs = [stream[lv + 1]]
        else:
            outputs = [v for v in graph.outputs if v.name in produces]
        name = "prefix" if lv < 0 else ("suffix" if lv == blocks_n else f"block {lv}")
        stages.append(Stage(name, nodes, inputs, outputs, produces))
    if not stages[-1].outputs:
        return "no graph output is computed from the last residual stream value"
    stages[0].outputs = [h0, *prefix_values]
    return BlockPartition(stages[0], stages[1:-1], stages[-1], stream)


def _constant_closure(nodes: Sequence[Node], const_nodes: set[int]) -> list[Node]:
    """The constant-only nodes the given nodes read, directly or through each other."""
    found: dict[int, Node] = {}
    stack = [v for n in nodes for v in n.inputs if v is not None]
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or id(node) not in const_nodes or id(node) in found:
            continue
        found[id(node)] = node
        stack.extend(v for v in node.inputs if v is not None)
    return list(found.values())


def _ancestors(nodes: Sequence[Node], names: set[str]) -> list[Node]:
    """The nodes of `nodes` (in their order) that compute the values `names` or what those read."""
    ids = {id(n) for n in nodes}
    keep: set[int] = set()
    stack = [n for n in nodes if any(o.name in names for o in n.outputs)]
    while stack:
        node = stack.pop()
        if id(node) in keep:
            continue
        keep.add(id(node))
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and id(producer) in ids and id(producer) not in keep:
                stack.append(producer)
    return [n for n in nodes if id(n) in keep]


def stage_model(model: Model, stage: Stage, extra_outputs: Iterable[str] = (),
                input_types: Mapping[str, DataType] | None = None, *, only_extras: bool = False) -> Model:
    """A standalone model of one stage: inputs `stage.inputs`, outputs `stage.outputs` then `extra_outputs`
    (names of values the stage computes), holding only the weights its nodes (and their constant-only
    producers) read. Tensors are shared with `model`; `model` is not changed. `input_types` gives the
    element type of inputs the graph leaves untyped (intermediate values shape inference did not reach).

    `only_extras=True` (the last stage, when nothing after it needs its outputs): the outputs are the
    `extra_outputs` alone and the nodes only those they depend on, so a statistic of the final norm's
    output does not load the lm_head's weight (262 MB on a 1B model with an untied head)."""
    graph = model.graph
    const_nodes = constant_nodes(graph)
    extra_outputs = list(extra_outputs)
    stage_nodes = list(stage.nodes)
    if only_extras and extra_outputs:
        stage_nodes = _ancestors(stage_nodes, set(extra_outputs)) or stage_nodes
    wanted = set(map(id, stage_nodes)) | set(map(id, _constant_closure(stage_nodes, const_nodes)))
    ordered = [n for n in graph if id(n) in wanted]  # graph order is topological
    mapping: dict[int, Value] = {}
    initializers: list[Value] = []

    def fresh(value: Value) -> Value:
        return Value(name=value.name, shape=value.shape, type=value.type,
                     const_value=value.const_value if value.is_initializer() else None)

    inputs = []
    for value in stage.inputs:
        mapping[id(value)] = new = fresh(value)
        if new.type is None and input_types and value.name in input_types:
            new.type = TensorType(input_types[value.name])
        inputs.append(new)

    def get(value: Value | None) -> Value | None:
        if value is None:
            return None
        new = mapping.get(id(value))
        if new is None:  # an initializer (a node output is mapped when its node is cloned)
            if not value.is_initializer():
                raise ValueError(f"{value.name!r} is neither an input of the stage nor computed in it")
            new = mapping[id(value)] = fresh(value)
            initializers.append(new)
        return new

    nodes = []
    for node in ordered:
        outs = [Value(name=o.name, shape=o.shape, type=o.type) for o in node.outputs]
        clone = Node(node.domain, node.op_type, [get(v) for v in node.inputs], list(node.attributes.values()),
                     overload=node.overload, outputs=outs, version=node.version, name=node.name)
        for key, text in node.metadata_props.items():
            clone.metadata_props[key] = text
        for old, new in zip(node.outputs, outs, strict=True):
            mapping[id(old)] = new
        nodes.append(clone)
    pruned = only_extras and extra_outputs and len(stage_nodes) < len(stage.nodes)
    outputs = [] if pruned else [mapping[id(v)] for v in stage.outputs]
    by_name = {v.name: v for v in mapping.values()}
    for name in extra_outputs:
        if name not in by_name:
            raise ValueError(f"{name!r} is not a value of {stage.name}")
        if all(o.name != name for o in outputs):
            outputs.append(by_name[name])
    sub = Graph(inputs, outputs, nodes=nodes, initializers=initializers,
                opset_imports=dict(graph.opset_imports), name=f"{graph.name or 'model'}-{stage.name}".replace(" ", "-"))
    return Model(sub, ir_version=model.ir_version, producer_name="optc",
                 functions=list(model.functions.values()))


__all__ = ["BlockPartition", "Stage", "constant_nodes", "find_blocks", "stage_model"]
