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
from typing import Any

from optc.ir.core import Model, Node, Value

PREFIX = "optc."

#: Well-known annotation keys.
PROVENANCE = "provenance"
SOURCE_NAME = "source_name"
QUANTIZATION = "quant"
SPARSITY = "sparsity"
GGUF_TYPE = "gguf_type"

#: Well-known model metadata keys.
ARCHITECTURE = "architecture"
HF_CONFIG = "hf_config"
TOKENIZER = "tokenizer"


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

#: Value annotation: the initializer holds the transpose of its source parameter.
SOURCE_TRANSPOSED = "source_transposed"

#: Value annotation: other state-dict names the same tensor stands for.
SOURCE_ALIASES = "source_aliases"
