"""The PyTorch frontend: an `nn.Module` plus example inputs → torch.export → ONNX → IR.

Uses the dynamo exporter (`torch.onnx.export(..., dynamo=True)`), which goes
through `torch.export` (the TorchScript exporter fails on current
transformers models). Axes named in `dynamic_axes` become symbolic; by default
the first axis of every input (the batch) is dynamic. Weights are written to a
temporary external-data file and stay memory-mapped in the IR until saved.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypedDict, Unpack

from optc.errors import OptcError
from optc.ir import DEFAULT_OPSET, Model, load_model, verify


def _example_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, tuple):
        return example_inputs
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    return (example_inputs,)


def _input_names(module: Any, count: int, given: Sequence[str] | None) -> list[str]:
    if given is not None:
        if len(given) != count:
            raise OptcError(f"input_names has {len(given)} names for {count} example inputs")
        return list(given)
    import inspect

    params = [
        p.name for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


class ExportSettings(TypedDict, total=False):
    """What both exports take besides the module and its example inputs."""

    input_names: Sequence[str] | None
    output_names: Sequence[str] | None
    #: Input name → {axis: symbolic name}.
    dynamic_axes: Mapping[str, Mapping[int, str]] | None
    opset: int


def export_module(module: Any, example_inputs: Any, **settings: Unpack[ExportSettings]) -> Model:
    """Export a module to optc's IR, weights in a temporary external-data file (see `ExportSettings`)."""
    folder = tempfile.TemporaryDirectory(prefix="optc-export-")
    path = Path(folder.name) / "model.onnx"
    try:
        _run_export(module, example_inputs, settings, f=str(path), external_data=True, optimize=True)
    except OptcError:
        folder.cleanup()
        raise
    model = load_model(path)
    # The external-data file must outlive the model that memory-maps it.
    weakref.finalize(model, folder.cleanup)
    model.meta["optc.export_dir"] = folder
    model.meta["optc.source_onnx"] = str(path)
    verify(model, where=f"after exporting {type(module).__name__}")
    return model


def export_graph(module: Any, example_inputs: Any, **settings: Unpack[ExportSettings]) -> Model:
    """The exporter's graph, unoptimized and unsaved: its initializers still wrap the module's own tensors.

    Nothing reads the parameters' values (torch.export traces with fake tensors), so a module whose
    parameters were never filled exports at the cost of its graph; the caller binds the weights.
    """
    return _run_export(module, example_inputs, settings, optimize=False).model


def _run_export(module: Any, example_inputs: Any, settings: ExportSettings, **how: Any) -> Any:
    """`torch.onnx.export(dynamo=True)` of `module` with `settings` and `how` (file, optimize); its ONNXProgram."""
    import torch

    args, names, shapes = _export_arguments(
        module, example_inputs, settings.get("input_names"), settings.get("dynamic_axes"))
    output_names = settings.get("output_names")
    module.eval()
    try:
        with _quiet(), torch.no_grad():
            return torch.onnx.export(
                module, args, dynamo=True, opset_version=settings.get("opset", DEFAULT_OPSET),
                input_names=names, output_names=list(output_names) if output_names else None,
                dynamic_shapes=shapes, verify=False, **how,
            )
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types
        raise OptcError(f"torch.export of {type(module).__name__} failed: {_export_error(exc)}") from exc


def _export_arguments(
    module: Any,
    example_inputs: Any,
    input_names: Sequence[str] | None,
    dynamic_axes: Mapping[str, Mapping[int, str]] | None,
) -> tuple[tuple[Any, ...], list[str], tuple[Any, ...]]:
    """The example arguments, input names and dynamic shapes (positional) torch.onnx.export takes."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise OptcError(f"expected a torch.nn.Module, got {type(module).__name__}")
    args = _example_tuple(example_inputs)
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise OptcError("example inputs must be torch tensors (a tensor or a tuple of tensors)")
    names = _input_names(module, len(args), input_names)
    if dynamic_axes is None:
        dynamic_axes = {name: {0: "batch"} for name, a in zip(names, args, strict=True) if a.dim() > 0}
    unknown = set(dynamic_axes) - set(names)
    if unknown:
        raise OptcError(f"dynamic_axes names unknown inputs {sorted(unknown)}; inputs: {names}")
    dims: dict[str, Any] = {}
    shapes: dict[str, dict[int, Any]] = {}
    for name, axes in dynamic_axes.items():
        shapes[name] = {}
        for axis, dim_name in axes.items():
            dims.setdefault(dim_name, torch.export.Dim(dim_name))
            shapes[name][int(axis)] = dims[dim_name]
    # Positional: a dict must be keyed by forward's own argument names, not input_names.
    return args, names, _positional_shapes(module, [shapes.get(n, {}) for n in names])


def _positional_shapes(module: Any, shapes: list[dict[int, Any]]) -> tuple[Any, ...]:
    """Dynamic shapes shaped like `forward`'s signature: the inputs a `*args` parameter takes form one tuple."""
    import inspect

    fixed = 0
    for parameter in inspect.signature(module.forward).parameters.values():
        if parameter.kind == parameter.VAR_POSITIONAL:
            return (*shapes[:fixed], tuple(shapes[fixed:]))
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            fixed += 1
    return tuple(shapes)


def _export_error(exc: BaseException) -> str:
    """The line of an exporter error that says what went wrong (its summary, without colour codes)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    if "## Exception summary" in lines:  # torch.onnx wraps the real error in a multi-line report
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            return after[0]
    return lines[0] if lines else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (errors still raise)."""
    sink = io.StringIO()
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
