"""Lazy Hugging Face weights: the graph of a model whose parameters are never filled, each initializer
bound to its tensor in the checkpoint's safetensors files and read only when something needs it.

`export_lazily(hf_model, checkpoint, export)` takes a model built with `accelerate.init_empty_weights`
(`empty_model`), gives every parameter uninitialized storage (untouched pages cost no memory; the
exporter traces with fake tensors and never reads them), exports the graph unoptimized, and replaces
each parameter's initializer by an `optc.ir.LazyTensor` whose function reads the tensor from its
safetensors file (memory-mapped by `safetensors.safe_open`), converts it to float32 and, where the
exporter had a `Transpose` of the weight, transposes it. The onnxscript optimizer then runs as the
eager export runs it, except that the transposes of bound weights were already folded into their
readers, so no large weight is read to export the model. Nothing caches the tensors read: each read
is a fresh array that is let go when its reader is done (`READS` counts them, per checkpoint key).

A model of more than `TEMPLATE_LAYERS` alike decoder layers is exported with `TEMPLATE_LAYERS` layers
only (`template_config`), and `repeat_last_block` then clones the last block of that graph once per
remaining layer, each clone's weights bound to its own layer's checkpoint tensors: torch.export and the
optimizer see two layers whatever the depth, so exporting takes the same time at every size and the
graph grows by one block per layer. The repetition checks that the template's two blocks are the same
computation on their own weights (else the caller exports every layer).

Llama's graph, logits and annotations are the eager export's (tests/frontends/test_lazy_weights.py).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from optc.errors import ModelLoadError
from optc.frontends.headers import read_safetensors_header
from optc.ir import (
    Attr,
    AttributeType,
    DataType,
    LazyTensor,
    Model,
    Node,
    Shape,
    Tensor,
    TensorType,
    Value,
    annotate,
    set_source_name,
)
from optc.ir.annotations import SOURCE_ALIASES, SOURCE_TRANSPOSED, annotation, source_name
from optc.ir.patterns.blocks import find_blocks
from optc.ir.patterns.builder import Builder

#: Reads of each checkpoint tensor in this process (key → count), for tests and diagnostics.
READS: collections.Counter[str] = collections.Counter()

#: The checkpoint dtypes read lazily (converted to float32 per tensor).
SUPPORTED_DTYPES = ("F32", "F16", "BF16")
#: The exporter's prefix of the wrapped model's parameter names.
_PREFIX = "hf."
#: The onnxscript constant folder's default input size limit (DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT in
#: onnxscript/optimizer/_constant_folding.py): larger inputs are folded only into their single consumer.
_FOLD_INPUT_LIMIT = 8192
#: Tensors at most this large are compared by content to find the ones the optimizer merged.
_SMALL = 1024
#: Decoder layers of the template export whose last block `repeat_last_block` repeats (two, so the
#: template's blocks can be compared and the repeated one reads the residual stream of a layer).
TEMPLATE_LAYERS = 2


class CheckpointTensor(NamedTuple):
    """One tensor of a safetensors file."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]


def index_checkpoint(folder: Path, label: str) -> dict[str, CheckpointTensor] | None:
    """Every tensor of the folder's safetensors files by name; None when the weights are not all
    safetensors in a dtype read lazily (the caller then loads them eagerly)."""
    files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if not files:
        return None
    index: dict[str, CheckpointTensor] = {}
    for file in files:
        header = read_safetensors_header(file, label)
        for key, (dtype, shape) in header.tensors.items():
            if dtype not in SUPPORTED_DTYPES:
                return None
            index[key] = CheckpointTensor(file, key, dtype, tuple(shape))
    return index


class _Read:
    """The function of a lazy initializer: the checkpoint tensor as float32, transposed when asked."""

    def __init__(self, tensor: CheckpointTensor, transposed: bool = False) -> None:
        self.tensor = tensor
        self.transposed = transposed

    def __call__(self) -> Tensor:
        import torch
        from safetensors import safe_open

        READS[self.tensor.key] += 1
        with safe_open(str(self.tensor.file), framework="pt") as handle:
            stored = handle.get_tensor(self.tensor.key)
        if self.transposed:  # transposed while converted: one float32 array, not two
            stored = stored.T
        array = torch.empty(tuple(stored.shape), dtype=torch.float32)
        array.copy_(stored)
        return Tensor(array.numpy())

    def __repr__(self) -> str:
        return f"_Read({self.tensor.key!r}{', transposed' if self.transposed else ''})"


def _lazy(tensor: CheckpointTensor, transposed: bool = False) -> LazyTensor:
    shape = tensor.shape[::-1] if transposed else tensor.shape
    return LazyTensor(_Read(tensor, transposed), dtype=DataType.FLOAT, shape=Shape(list(shape)))


def _read_of(value: Value) -> _Read | None:
    data = value.const_value
    if isinstance(data, LazyTensor) and isinstance(data.raw, _Read):
        return data.raw
    return None


def checkpoint_files(model: Model) -> list[Path]:
    """The files the model's lazy weights are read from (inputs, never to be overwritten)."""
    files = {read.tensor.file for value in model.graph.initializers.values() if (read := _read_of(value))}
    return sorted(files)


def empty_model(build: Callable[[], Any]) -> Any:
    """`build()` (a transformers model) with its parameters on the meta device, tied as configured, and
    its buffers real."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = build()
    model.tie_weights()  # skipped on the meta device
    return model


def _parameter_groups(hf_model: Any) -> list[list[str]]:
    """The model's parameters as groups of names sharing one tensor (tied weights), in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, parameter in hf_model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(parameter), []).append(name)
    order = {name: i for i, name in enumerate(hf_model.state_dict(keep_vars=True))}
    for names in groups.values():
        names.sort(key=lambda n: order.get(n, len(order)))
    return list(groups.values())


def _fill_empty(hf_model: Any) -> None:
    """Give every (meta) parameter float32 storage that is allocated but never written, keeping ties."""
    import torch

    filled: dict[int, torch.nn.Parameter] = {}
    for module in hf_model.modules():
        for name, parameter in list(module._parameters.items()):  # noqa: SLF001 - torch's own table
            if parameter is None:
                continue
            if id(parameter) not in filled:
                filled[id(parameter)] = torch.nn.Parameter(
                    torch.empty(parameter.shape, dtype=torch.float32), requires_grad=False)
            module._parameters[name] = filled[id(parameter)]  # noqa: SLF001


def export_lazily(
    hf_model: Any, checkpoint: dict[str, CheckpointTensor], label: str, export: Callable[[Any], Model],
) -> tuple[Model, dict[str, str]]:
    """Export `hf_model` (built by `empty_model`) through `export(hf_model)` and bind its weights to
    `checkpoint` lazily; returns the model and the tied aliases `{alias: stored name}`."""
    groups = _parameter_groups(hf_model)
    bound: dict[str, tuple[CheckpointTensor, list[str]]] = {}  # every name of a group → (its tensor, the group)
    missing, mismatched = [], []
    shapes = {name: tuple(p.shape) for name, p in hf_model.named_parameters(remove_duplicate=False)}
    for names in groups:
        stored = next((n for n in names if n in checkpoint), None)
        if stored is None:
            missing.append(names[0])
            continue
        if checkpoint[stored].shape != shapes[names[0]]:
            mismatched.append(stored)
            continue
        for name in names:
            bound[name] = (checkpoint[stored], names)
    for kind, keys in (("missing", missing), ("mismatched", mismatched)):
        if keys:
            shown = ", ".join(sorted(keys)[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            raise ModelLoadError(f"{label}: the weights do not match config.json: {kind} {shown}")
    _fill_empty(hf_model)
    storage = {p.data_ptr(): name for name, p in hf_model.named_parameters()}
    model = export(hf_model)
    graph = model.graph
    for value in graph.initializers.values():
        name = (value.name or "")[len(_PREFIX):] if (value.name or "").startswith(_PREFIX) else value.name or ""
        raw = getattr(value.const_value, "raw", None)
        pointer = raw.data_ptr() if hasattr(raw, "data_ptr") else None
        if name not in bound and pointer in storage:
            name = storage[pointer]  # an initializer the exporter renamed
        if name in bound:
            value.const_value = _lazy(bound[name][0])
        elif pointer in storage:  # pragma: no cover - every parameter is bound above
            raise ModelLoadError(f"{label}: the export holds parameter {storage[pointer]} unbound")
        elif raw is not None and hasattr(raw, "numpy"):  # buffers and constants: small, real, copied
            value.const_value = Tensor(raw.detach().cpu().numpy(), name=value.const_value.name)
    _fold_lazy_transposes(model)
    _optimize(model)
    tied = {alias: names[0] for names in groups for alias in names[1:]}
    _annotate(model, bound)
    return model, tied


def _fold_lazy_transposes(model: Model) -> None:
    """Replace `Transpose(W)` of a bound 2-D weight by W read transposed, where the optimizer folds it in
    the eager export (W used only there, or small enough for its size limit), without reading W now."""
    limit = _FOLD_INPUT_LIMIT
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        read = _read_of(source) if source is not None else None
        perm = node.attributes.get("perm")
        if read is None or read.transposed or len(read.tensor.shape) != 2:
            continue
        shared = len(source.uses()) != 1
        if shared and math.prod(read.tensor.shape) > limit:
            continue
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        output = node.outputs[0]
        name = output.name
        folded = Value(name=None, shape=Shape(list(read.tensor.shape[::-1])), type=TensorType(DataType.FLOAT),
                       const_value=_lazy(read.tensor, transposed=True))
        output.replace_all_uses_with(folded)
        graph.remove(node, safe=True)
        if not shared:
            graph.initializers.pop(source.name)
        output.name = None
        folded.name = name
        graph.register_initializer(folded)


def _optimize(model: Model) -> None:
    """The optimizer the dynamo exporter runs (`optimize=True`), on the graph with lazy weights."""
    import onnxscript.optimizer
    import onnxscript.rewriter.onnx_fusions

    onnxscript.optimizer.optimize_ir(model)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _digest(tensor: Any) -> tuple[str, tuple[int, ...], str]:
    array = np.ascontiguousarray(tensor.numpy())
    return array.dtype.str, array.shape, hashlib.blake2b(array.view(np.uint8).reshape(-1), digest_size=16).hexdigest()


def _annotate(model: Model, bound: dict[str, tuple[CheckpointTensor, list[str]]]) -> None:
    """Each lazy initializer's state-dict name, transposition and aliases (tied or merged parameters)."""
    survivors: dict[str, list[Value]] = {}  # checkpoint key → its initializers (as is, transposed)
    for value in model.graph.initializers.values():
        read = _read_of(value)
        if read is not None:
            survivors.setdefault(read.tensor.key, []).append(value)
    merged: dict[str, list[str]] = {}
    stored_groups = {tensor.key: names for tensor, names in bound.values()}
    gone = [key for key in stored_groups if key not in survivors]
    if gone:  # small tensors the optimizer's deduplication merged: find each one's survivor by content
        small = {_digest(v.const_value): key for key, values in survivors.items() for v in values
                 if v.const_value.size <= _SMALL and not _read_of(v).transposed}
        for key in gone:
            keeper = small.get(_digest(_lazy(bound[stored_groups[key][0]][0])))
            if keeper is not None:
                merged.setdefault(keeper, []).append(key)
    for key, values in survivors.items():
        names = stored_groups[key]
        aliases = list(names[1:])
        for other in merged.get(key, []):
            aliases += stored_groups[other]
        for value in values:
            set_source_name(value, names[0])
            if _read_of(value).transposed:
                annotate(value, SOURCE_TRANSPOSED, True)
            if aliases:
                annotate(value, SOURCE_ALIASES, aliases)


# --------------------------------------------------------------------------- one block, repeated


def template_config(config: Any) -> Any | None:
    """A copy of the HF `config` with `TEMPLATE_LAYERS` decoder layers, when it has more and describes every
    layer alike (each per-layer list of the config, such as `layer_types`, holds one value); else None."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers <= TEMPLATE_LAYERS:
        return None
    per_layer = {}
    for key, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == layers:
            if any(v != value[0] for v in value):
                return None
            per_layer[key] = value[:TEMPLATE_LAYERS]
    template = copy.deepcopy(config)
    template.num_hidden_layers = TEMPLATE_LAYERS
    for key, value in per_layer.items():
        setattr(template, key, value)
    return template


def _layer_key(first: str, second: str) -> Callable[[int], str] | None:
    """From the names of one tensor in layers 0 and 1 (`...layers.0.x`, `...layers.1.x`), its name in any
    layer; None when the two names do not differ in one layer index between separators."""
    if len(first) != len(second):
        return None
    diff = [i for i, (a, b) in enumerate(zip(first, second, strict=True)) if a != b]
    if len(diff) != 1 or (first[diff[0]], second[diff[0]]) != ("0", "1"):
        return None
    i = diff[0]
    if (i > 0 and first[i - 1].isdigit()) or (i + 1 < len(first) and first[i + 1].isdigit()):
        return None
    return lambda layer: f"{first[:i]}{layer}{first[i + 1:]}"


def _same_attributes(a: Node, b: Node) -> bool:
    if a.attributes.keys() != b.attributes.keys():
        return False
    for key, x in a.attributes.items():
        y = b.attributes[key]
        if x.type != y.type or x.type in (AttributeType.GRAPH, AttributeType.GRAPHS, AttributeType.TENSORS):
            return False
        if x.type == AttributeType.TENSOR:
            if not np.array_equal(x.value.numpy(), y.value.numpy()):
                return False
        elif x.value != y.value:
            return False
    return True


@dataclasses.dataclass
class _Weight:
    """A lazy weight of the repeated block: its value, and its checkpoint key and source name per layer."""

    value: Value
    key: Callable[[int], str]
    source: Callable[[int], str]


def _match_blocks(first: list[Node], second: list[Node], stream: tuple[Value, Value, Value]) -> list[_Weight] | str:
    """Whether block 1 is block 0's computation on its own weights: the weights of block 1 (to rebind per
    layer), else why not."""
    if len(first) != len(second):
        return f"the template's blocks have {len(first)} and {len(second)} nodes"
    inside = set(map(id, second))
    seen: dict[int, Value] = {id(stream[0]): stream[1]}
    weights: dict[int, _Weight] = {}
    for a, b in zip(first, second, strict=True):
        if (a.op_type, a.domain, a.overload, len(a.inputs), len(a.outputs)) != \
                (b.op_type, b.domain, b.overload, len(b.inputs), len(b.outputs)) or not _same_attributes(a, b):
            return f"{a.op_type} ({a.name}) and {b.op_type} ({b.name}) differ"
        for x, y in zip(a.inputs, b.inputs, strict=True):
            if x is None or y is None:
                if x is not y:
                    return f"{b.op_type} ({b.name}) has an input block 0's does not"
            elif id(x) in seen:
                if seen[id(x)] is not y:
                    return f"{b.op_type} ({b.name}) reads another value than in block 0"
            elif x is y:
                if _read_of(x) is not None:  # equal weights the optimizer merged: whose is it in other layers?
                    return f"both blocks read {_read_of(x).tensor.key}"
                continue  # a side value, graph input or constant both blocks share
            elif x.is_initializer() and y.is_initializer():
                rx, ry = _read_of(x), _read_of(y)
                if rx is None and ry is None:
                    same = x.const_value.dtype == y.const_value.dtype and np.array_equal(
                        x.const_value.numpy(), y.const_value.numpy())
                    if not same:
                        return f"{b.op_type} ({b.name}) reads a constant unlike block 0's"
                    continue  # equal constants: the clones read block 1's
                if rx is None or ry is None or rx.transposed != ry.transposed:
                    return f"{b.op_type} ({b.name}) reads a weight unlike block 0's"
                key = _layer_key(rx.tensor.key, ry.tensor.key)
                source = _layer_key(source_name(x), source_name(y))
                if key is None or source is None or annotation(y, SOURCE_ALIASES) or annotation(x, SOURCE_ALIASES):
                    return f"{b.op_type} ({b.name}) reads {ry.tensor.key}, not layer 1's counterpart of {rx.tensor.key}"
                if any(id(use.node) not in inside for use in y.uses()):
                    return f"{ry.tensor.key} is read outside its block"
                weights.setdefault(id(y), _Weight(y, key, source))
            else:
                return f"{b.op_type} ({b.name}) reads {y.name!r}, which block 0 does not read"
        for x, y in zip(a.outputs, b.outputs, strict=True):
            seen[id(x)] = y
    if seen.get(id(stream[1])) is not stream[2]:
        return "the template's blocks do not end alike"
    for node in second:
        for out in node.outputs:
            if out is not stream[2] and (out.is_graph_output() or any(id(u.node) not in inside for u in out.uses())):
                return f"{out.name!r} of block 1 is read outside it"
    return list(weights.values())


def repeat_last_block(model: Model, layers: int, checkpoint: dict[str, CheckpointTensor], label: str) -> str | None:
    """Extend the export of a `TEMPLATE_LAYERS`-layer model (`template_config`) to `layers` layers in place:
    clone its last block once per further layer, each clone's lazy weights bound to that layer's
    tensors of `checkpoint`, and feed the last clone's output to the head. Returns None when done, else
    why the template cannot be repeated (the model is then unchanged)."""
    graph = model.graph
    partition = find_blocks(model, layers=TEMPLATE_LAYERS)
    if isinstance(partition, str):
        return partition
    if len(partition.blocks) != TEMPLATE_LAYERS:
        return f"{len(partition.blocks)} blocks in a template of {TEMPLATE_LAYERS} layers"
    first, second = partition.blocks
    stream = partition.stream
    weights = _match_blocks(first.nodes, second.nodes, (stream[0], stream[1], stream[2]))
    if isinstance(weights, str):
        return weights
    if stream[2].is_graph_output():
        return "the last residual stream value is a graph output"
    order = {id(node): i for i, node in enumerate(graph)}
    head = min((order[id(n)] for n in partition.suffix.nodes), default=len(order))
    if any(order[id(n)] > head for n in second.nodes):
        return "the head's nodes are interleaved with the last block's"
    missing = []
    for weight in weights:
        tensor = _read_of(weight.value).tensor
        for layer in range(TEMPLATE_LAYERS, layers):
            found = checkpoint.get(weight.key(layer))
            if found is None or found.shape != tensor.shape:
                missing.append(weight.key(layer))
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
        raise ModelLoadError(f"{label}: the weights do not match config.json: missing {shown}")
    anchor = next((n for n in graph if order[id(n)] == head), None)
    readers = [(use.node, use.idx) for use in stream[2].uses()]
    build = Builder(graph)
    last = stream[2]
    for layer in range(TEMPLATE_LAYERS, layers):
        last = _clone_block(graph, build, second.nodes, (stream[1], stream[2]), last, weights, checkpoint, layer, anchor)
    for node, index in readers:
        node.replace_input_with(index, last)
    return None


def _clone_block(graph: Any, build: Builder, nodes: list[Node], ends: tuple[Value, Value], into: Value,
                 weights: list[_Weight], checkpoint: dict[str, CheckpointTensor], layer: int, anchor: Node | None) -> Value:
    """One copy of the block `nodes` (from residual stream value `ends[0]` to `ends[1]`) reading `into`, with
    `layer`'s weights; inserted before `anchor` (appended when None). Returns the copy's stream output."""
    mapping: dict[int, Value] = {id(ends[0]): into}
    for weight in weights:
        template = weight.value
        read = _read_of(template)
        value = Value(name=build.fresh(f"{template.name}_layer{layer}"), shape=template.shape.copy(),
                      type=template.type, const_value=_lazy(checkpoint[weight.key(layer)], read.transposed))
        for key, text in template.metadata_props.items():
            value.metadata_props[key] = text
        set_source_name(value, weight.source(layer))
        graph.register_initializer(value)
        mapping[id(template)] = value
    clones = []
    for node in nodes:
        outputs = [Value(name=build.fresh(f"{o.name}_layer{layer}"), shape=o.shape.copy() if o.shape is not None else None,
                         type=o.type) for o in node.outputs]
        attributes = [Attr(a.name, a.type, a.value, doc_string=a.doc_string) for a in node.attributes.values()]
        clone = Node(node.domain, node.op_type, [mapping.get(id(v), v) if v is not None else None for v in node.inputs],
                     attributes, overload=node.overload, outputs=outputs, version=node.version,
                     name=build.node_name(f"{node.name}_layer{layer}") if node.name else None)
        for key, text in node.metadata_props.items():
            clone.metadata_props[key] = text
        for old, new in zip(node.outputs, outputs, strict=True):
            mapping[id(old)] = new
            for key, text in old.metadata_props.items():
                new.metadata_props[key] = text
        clones.append(clone)
    if anchor is None:
        graph.extend(clones)
    else:
        graph.insert_before(anchor, clones)
    return mapping[id(ends[1])]


__all__ = [
    "READS", "SUPPORTED_DTYPES", "TEMPLATE_LAYERS", "CheckpointTensor", "checkpoint_files", "empty_model", "export_lazily",
    "index_checkpoint", "repeat_last_block", "template_config",
]
