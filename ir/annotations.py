"""Annotations that passes hand to backends, and model metadata that survives the pipeline.

Annotations live in the `metadata_props` of nodes and values under the `optc.`
prefix, as JSON, so they survive ONNX export and import unchanged:

* node/value annotations: quantization parameters, sparsity pattern, GGUF type,
  provenance (the pass that created a node);
* model metadata: architecture, HF config, tokenizer;
* `source_name`: each initializer's original parameter name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from optc.ir.core import Model, Node, Value

PREFIX = "optc."

# Every key optc writes under its prefix; `SCHEMA` below gives each one's type.
#: Node annotation: the pass that created the node.
PROVENANCE = "provenance"
#: Value annotation: the initializer's original parameter name.
SOURCE_NAME = "source_name"
#: Value annotation: the initializer holds the transpose of its source parameter.
SOURCE_TRANSPOSED = "source_transposed"
#: Value annotation: other state-dict names the same tensor stands for.
SOURCE_ALIASES = "source_aliases"
#: Value annotation: the initializer holds its source parameter plus this constant (gemma's folded 1 + w norms).
SOURCE_OFFSET = "source_offset"
#: Node annotation: how the node was quantized (`op`, `weights`, `activations` and their schemes).
QUANTIZATION = "quant"
#: Node annotation: why a node the quantizer could take was left in float.
QUANTIZATION_SKIPPED = "quant_skipped"
#: Node/value annotation: the N:M or unstructured sparsity of a weight.
SPARSITY = "sparsity"
#: Node annotations of the transforms that rewrote the node.
SMOOTHQUANT = "smoothquant"
AWQ = "awq"
LOWRANK = "lowrank"
PRUNED_HEADS = "pruned_heads"
PRUNED_FFN = "pruned_ffn"
#: Node annotation and model metadata: how the onnxruntime int8 lowering rewrote the node / the model.
ORT_LOWERING = "ort_lowering"
#: Value annotation: the GGUF type a weight is encoded as.
GGUF_TYPE = "gguf_type"
#: Value annotation: the importance matrix (per input column mean of x²) the encoder weights errors by.
GGUF_IMATRIX = "gguf_imatrix"

#: Model metadata: the HF architecture class name.
ARCHITECTURE = "architecture"
#: Model metadata: the HF config as JSON.
HF_CONFIG = "hf_config"
#: Model metadata: the tokenizer's files, `{"files": {name: text}}`.
TOKENIZER = "tokenizer"
#: Model metadata: tied parameter aliases, `{alias: stored name}`.
TIED_PARAMETERS = "tied_parameters"
#: Model metadata: what the frontend exported (task, inputs, outputs, source format).
HF_EXPORT = "hf_export"
#: Model metadata: `[heads, kv_heads]` per attention layer after prune-heads.
LAYER_HEADS = "layer_heads"
#: Model metadata: the FFN width per layer after prune-ffn.
LAYER_FFN = "layer_ffn"
#: Model metadata: the notes of lower-tensorrt's runs.
TENSORRT_LOWERING = "tensorrt_lowering"
#: Model metadata: that (and how) lower-ort-nbits lowered the model; a later `form=auto` run keeps it.
ORT_NBITS_LOWERING = "ort_nbits_lowering"
#: Model metadata written by `kquant`: `{"mix": "Q4_K_M", "imatrix": {...} | None}`.
GGUF_PLAN = "gguf"


def _key(key: str) -> str:
    return key if key.startswith(PREFIX) else PREFIX + key


def annotate(obj: Node | Value | Model, key: str, value: Any) -> None:
    """Attach a JSON-serializable annotation; `None` removes it."""
    props = obj.metadata_props
    if value is None:
        props.pop(_key(key), None)
    else:
        props[_key(key)] = json.dumps(value, sort_keys=True, separators=(",", ":"))


def annotation(obj: Node | Value | Model, key: str, default: Any = None) -> Any:
    """Read one annotation back, or `default` when it is absent."""
    raw = obj.metadata_props.get(_key(key))
    return default if raw is None else json.loads(raw)


def annotations(obj: Node | Value | Model) -> dict[str, Any]:
    """All optc annotations of an object, keyed without the prefix, in sorted order."""
    return {
        k[len(PREFIX):]: json.loads(v)
        for k, v in sorted(obj.metadata_props.items())
        if k.startswith(PREFIX)
    }


def set_source_name(value: Value, name: str) -> None:
    """Record the original parameter name of an initializer (e.g. `model.layers.0.mlp.up_proj.weight`)."""
    annotate(value, SOURCE_NAME, name)


def source_name(value: Value) -> str:
    """The original parameter name of an initializer, falling back to its IR name."""
    return annotation(value, SOURCE_NAME, value.name or "")


def set_model_metadata(model: Model, key: str, value: Any) -> None:
    """Store model-level metadata (architecture, HF config, tokenizer...)."""
    annotate(model, key, value)


def model_metadata(model: Model, key: str, default: Any = None) -> Any:
    """Read model-level metadata stored by `set_model_metadata`."""
    return annotation(model, key, default)


# --------------------------------------------------------------------------- the schema

#: The Python type(s) a JSON value may have (json.loads: dict, list, str, int, float, bool, None).
JsonTypes = type | tuple[type, ...]
#: A JSON number (a bool is not one).
NUMBER = (int, float)


@dataclass(frozen=True)
class Field:
    """One field of a dict-valued annotation: its type(s), and whether it must be there."""

    types: JsonTypes
    required: bool = False


@dataclass(frozen=True)
class AnnotationSpec:
    """What one key holds: its JSON type and, for a dict, the types of the fields optc reads back."""

    types: JsonTypes
    #: For a list: the type of its items.
    items: JsonTypes | None = None
    #: For a dict: known fields (others are allowed: passes add their own details).
    fields: dict[str, Field] = field(default_factory=dict)


_OPTIONAL_STR = (str, type(None))
_OPTIONAL_INT = (int, type(None))


def record(required: dict[str, JsonTypes], optional: dict[str, JsonTypes] | None = None) -> AnnotationSpec:
    """A dict-valued key: the fields it must hold and those it may hold, each with its type(s)."""
    fields = {name: Field(types, required=True) for name, types in required.items()}
    fields.update({name: Field(types) for name, types in (optional or {}).items()})
    return AnnotationSpec(dict, fields=fields)


#: What smoothquant and awq record of one folded scale.
_SCALE_FOLD = {"alpha": NUMBER, "producer": str, "input": str}

#: Every key optc writes, with the type it must hold (checked by the verifier).
SCHEMA: dict[str, AnnotationSpec] = {
    PROVENANCE: AnnotationSpec(str),
    SOURCE_NAME: AnnotationSpec(str),
    SOURCE_TRANSPOSED: AnnotationSpec(bool),
    SOURCE_ALIASES: AnnotationSpec(list, items=str),
    SOURCE_OFFSET: AnnotationSpec(NUMBER),
    QUANTIZATION: record({"op": str}, {
        "weights": str, "activations": str, "bits": int, "group": int, "symmetric": bool,
        "weight": str, "weight_source": str, "weight_scheme": str, "weight_axis": _OPTIONAL_INT, "weight_bits": int,
        "weight_pair_limit": int, "activation_scheme": str, "activation_range": list, "activation_threshold": NUMBER,
        "activation_scale": NUMBER, "activation_zero_point": int, "activation_absmax": NUMBER,
        "precision_reason": str, "residual": str, "method": str,
    }),
    QUANTIZATION_SKIPPED: AnnotationSpec(str),
    SPARSITY: record({"pattern": str}, {"axis": _OPTIONAL_INT, "method": str, "sparsity": NUMBER}),
    SMOOTHQUANT: record({}, _SCALE_FOLD),
    AWQ: record({}, _SCALE_FOLD),
    LOWRANK: record({"rank": int}, {"in": int, "out": int}),
    PRUNED_HEADS: record({}, {"heads": int, "kv_heads": int, "of": int}),
    PRUNED_FFN: record({"width": int}, {"of": int}),
    ORT_LOWERING: AnnotationSpec(dict),
    GGUF_TYPE: AnnotationSpec(str),
    GGUF_IMATRIX: AnnotationSpec(list, items=NUMBER),
    ARCHITECTURE: AnnotationSpec(str),
    HF_CONFIG: AnnotationSpec(dict),
    TOKENIZER: record({"files": dict}),
    TIED_PARAMETERS: AnnotationSpec(dict),
    HF_EXPORT: AnnotationSpec(dict),
    LAYER_HEADS: AnnotationSpec(list, items=list),
    LAYER_FFN: AnnotationSpec(list, items=_OPTIONAL_INT),
    TENSORRT_LOWERING: AnnotationSpec(list, items=str),
    ORT_NBITS_LOWERING: record({"form": str}),
    GGUF_PLAN: record({}, {"mix": _OPTIONAL_STR}),
}


def register_annotation(key: str, spec: AnnotationSpec) -> None:
    """Declare a key a plugin writes under optc's prefix, so that the verifier accepts it."""
    known = SCHEMA.get(key)
    if known is not None and known != spec:
        raise ValueError(f"annotation key {key!r} is already declared with another type")
    SCHEMA[key] = spec


def _is(value: Any, types: JsonTypes) -> bool:
    """isinstance for JSON values: a bool is neither an int nor a float."""
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool):
        return bool in wanted
    return isinstance(value, wanted)


def _type_names(types: JsonTypes) -> str:
    wanted = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in wanted)


def annotation_problems(obj: Node | Value | Model, where: str) -> list[str]:
    """What breaks the schema in the optc annotations of `obj` (named `where` in the messages)."""
    found: list[str] = []
    for raw_key, raw in sorted(obj.metadata_props.items()):
        if not raw_key.startswith(PREFIX):
            continue
        key = raw_key[len(PREFIX):]
        spec = SCHEMA.get(key)
        if spec is None:
            found.append(f"{where}: unknown annotation key {raw_key!r}")
            continue
        try:
            value = json.loads(raw)
        except ValueError:
            found.append(f"{where}: annotation {raw_key!r} is not JSON")
            continue
        found += [f"{where}: annotation {raw_key!r} {problem}" for problem in _value_problems(value, spec)]
    return found


def _value_problems(value: Any, spec: AnnotationSpec) -> list[str]:
    if not _is(value, spec.types):
        return [f"must be {_type_names(spec.types)}, not {type(value).__name__}"]
    found: list[str] = []
    if spec.items is not None:
        for index, item in enumerate(value):
            if not _is(item, spec.items):
                found.append(f"item {index} must be {_type_names(spec.items)}, not {type(item).__name__}")
                break
    for name, expected in spec.fields.items():
        if name not in value:
            if expected.required:
                found.append(f"lacks field {name!r}")
        elif not _is(value[name], expected.types):
            found.append(f"field {name!r} must be {_type_names(expected.types)}, not {type(value[name]).__name__}")
    return found
