"""Raising a model's default-domain (ai.onnx) opset, converting its nodes: the one place every pass uses.

A pass that emits ops of a newer opset (blocked `DequantizeLinear` and INT4
need 21, FP8 Q/DQ 19, per-axis Q/DQ 13) calls `ensure_opset(model, N)`
before it changes the graph. Below N the existing nodes are converted with
onnxscript's version converter (`onnxscript.version_converter`, which hands
opsets below 18 to `onnx.version_converter` through a proto of the graph
without its weights): `ReduceMean`'s and `Squeeze`'s `axes` attributes become
inputs, and so on. optc's annotations (the `metadata_props` of nodes and
values) and the model's IR version are kept right through the conversion.

The fallback path rebuilds the graph, so a caller must look up nodes and
values again after a conversion (`ensure_opset` returns True then).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import onnx
import onnx.helper

from optc.errors import OptcError, first_line
from optc.ir.core import Graph, Model

_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Loggers of the converter that would print warnings (the C API fallback, skipped nodes) to stderr.
_CONVERTER_LOGGERS = ("onnxscript", "onnx_ir")


def default_opset(model: Model) -> int | None:
    """The model's ai.onnx opset version, or None when it imports none."""
    imports = model.graph.opset_imports
    for domain in _DEFAULT_DOMAINS:
        if domain in imports:
            return int(imports[domain])
    return None


def ensure_opset(model: Model, minimum: int) -> bool:
    """Raise the default-domain opset to at least `minimum`, converting existing nodes; True if it changed.

    Raises `OptcError` (one line) when a node cannot be converted: the run
    stops there (a pass failure), so no half-converted model is written.
    """
    current = default_opset(model)
    if current is not None and current >= minimum:
        return False
    if current is None or not _has_default_domain_nodes(model.graph):
        for domain in _DEFAULT_DOMAINS:
            model.graph.opset_imports.pop(domain, None)
        model.graph.opset_imports[""] = minimum
    else:
        _convert(model, current, minimum)
    needed = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", minimum)])
    if model.ir_version is None or model.ir_version < needed:
        model.ir_version = needed
    return True


def _convert(model: Model, current: int, target: int) -> None:
    from onnxscript import version_converter

    if "ai.onnx" in model.graph.opset_imports:  # the converter reads the "" spelling only
        model.graph.opset_imports[""] = model.graph.opset_imports.pop("ai.onnx")
    saved = _metadata(model.graph)
    failed = f"cannot convert the model from opset {current} to {target}"
    try:
        with _quiet_converter() as skipped:
            version_converter.convert_version(model, target, fallback=True)
    except Exception as exc:  # noqa: BLE001 - the converter raises several types
        raise OptcError(f"{failed}: {first_line(exc)}") from exc
    if skipped:  # the converter skips a node it cannot convert and carries on: refuse the result
        raise OptcError(f"{failed}: {skipped[0]}")
    if default_opset(model) != target:  # the onnx C API fallback failed and left the model as it was
        raise OptcError(f"{failed}: onnx's version converter failed; convert the model to opset {target} first")
    _restore_metadata(model.graph, saved)


def _has_default_domain_nodes(graph: Graph) -> bool:
    return any(node.domain in _DEFAULT_DOMAINS for node in _all_nodes(graph))


def _all_nodes(graph: Graph) -> Iterator:
    from optc.ir.core import AttributeType

    for node in graph:
        yield node
        for attr in node.attributes.values():
            if attr.type == AttributeType.GRAPH:
                yield from _all_nodes(attr.value)
            elif attr.type == AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from _all_nodes(sub)


def _metadata(graph: Graph) -> tuple[dict[str, str], dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The graph's, its nodes' (by name) and its values' (by name) metadata_props."""
    nodes: dict[str, dict[str, str]] = {}
    values: dict[str, dict[str, str]] = {}
    for value in [*graph.inputs, *graph.initializers.values()]:
        if value.name and value.metadata_props:
            values[value.name] = dict(value.metadata_props)
    for node in _all_nodes(graph):
        if node.name and node.metadata_props:
            nodes[node.name] = dict(node.metadata_props)
        for value in node.outputs:
            if value.name and value.metadata_props:
                values[value.name] = dict(value.metadata_props)
    return dict(graph.metadata_props), nodes, values


def _restore_metadata(graph: Graph, saved: tuple[dict[str, str], dict[str, dict[str, str]], dict[str, dict[str, str]]]) -> None:
    """Put back metadata_props a rebuilt graph lost, matched by node and value names."""
    graph_props, nodes, values = saved
    for key, text in graph_props.items():
        graph.metadata_props.setdefault(key, text)
    for value in [*graph.inputs, *graph.initializers.values()]:
        for key, text in values.get(value.name or "", {}).items():
            value.metadata_props.setdefault(key, text)
    for node in _all_nodes(graph):
        for key, text in nodes.get(node.name or "", {}).items():
            node.metadata_props.setdefault(key, text)
        for value in node.outputs:
            for key, text in values.get(value.name or "", {}).items():
                value.metadata_props.setdefault(key, text)


class _SkippedNodes(logging.Handler):
    """Collects the converter's "Skipping version conversion for node ..." warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Skipping version conversion"):
            self.messages.append(message.splitlines()[0][:200])


@contextlib.contextmanager
def _quiet_converter() -> Iterator[list[str]]:
    """Keep the converter's log records off stderr (optc reports failures itself); yields the skipped nodes."""
    collector = _SkippedNodes()
    loggers = [logging.getLogger(name) for name in _CONVERTER_LOGGERS]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
        logger.propagate = False
        logger.addHandler(collector)
    try:
        yield collector.messages
    finally:
        for logger, (level, propagate) in zip(loggers, saved, strict=True):
            logger.removeHandler(collector)
            logger.setLevel(level)
            logger.propagate = propagate



__all__ = ["default_opset", "ensure_opset"]
