"""ONNX import and export for the IR.

Import keeps external-data weights lazy (memory-mapped on first access, never
copied until a pass changes them). Export is atomic: files are written into a
temporary folder beside the destination and renamed into place only once
complete, so a failed run leaves no partial output. Weights that came from
external data stay external; a model too large for one protobuf (2 GiB) is
always saved with external data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as _oir
from google.protobuf.message import DecodeError

from optc.errors import ModelLoadError, OptcError, WriteError
from optc.ir.core import ExternalTensor, Model, initializer_bytes

#: Above this many bytes of initializers a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: Tensors smaller than this stay inside the protobuf even when saving external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load_model(path: str | os.PathLike) -> Model:
    """Load an ONNX file into the IR, with one clear error for every bad input."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated ({_short(exc)})") from exc
    except OSError as exc:
        raise ModelLoadError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if proto.ir_version == 0 or not proto.HasField("graph") or not proto.graph.output:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated (no graph with outputs)")
    if not proto.opset_import:
        raise ModelLoadError(f"{path}: not an ONNX model or truncated (no opset_import)")
    try:
        model = _oir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx-ir raises many types on malformed protos
        raise ModelLoadError(f"{path}: malformed ONNX model ({_short(exc)})") from exc
    _oir.external_data.set_base_dir(model.graph, str(path.parent))
    _check_external_data(model, path)
    return model


def _check_external_data(model: Model, path: Path) -> None:
    """Every external tensor must point into a file that holds all its bytes."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        data = value.const_value
        if not isinstance(data, ExternalTensor):
            continue
        file = str(data.path)
        if file not in sizes:
            if not os.path.isfile(file):
                raise ModelLoadError(f"{path}: external data file {data.location!r} is missing")
            sizes[file] = os.path.getsize(file)
        end = (data.offset or 0) + (data.length if data.length is not None else data.nbytes)
        if end > sizes[file]:
            raise ModelLoadError(
                f"{path}: external data file {data.location!r} is truncated "
                f"(tensor {value.name!r} needs {end} bytes, file has {sizes[file]})"
            )


def has_external_data(model: Model) -> bool:
    """True when any initializer is stored outside the protobuf."""
    return any(isinstance(v.const_value, ExternalTensor) for v in model.graph.initializers.values())


def save_model(
    model: Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write the model atomically; returns the path written.

    `external_data=None` chooses: external when the model came with external
    data or its weights exceed `EXTERNAL_DATA_THRESHOLD`. The data file is
    `<name>.data` beside the model; large tensors in it are aligned to 64 KiB
    so runtimes can memory-map them. `check`, if given, runs on the staged
    file before it is moved into place; if it raises, nothing is written.
    """
    path = Path(path)
    if external_data is None:
        external_data = has_external_data(model) or initializer_bytes(model.graph) > EXTERNAL_DATA_THRESHOLD
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise OptcError(f"{path}: output folder {directory} does not exist")
    data_name = path.name + ".data"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        staged_model = staging / path.name
        try:
            if external_data:
                _oir.save(
                    model,
                    staged_model,
                    external_data=data_name,
                    size_threshold_bytes=EXTERNAL_TENSOR_MIN_BYTES - 1,  # onnx-ir externalizes nbytes > threshold
                    alignment=1 << 16,
                )
            else:
                _oir.save(model, staged_model)
        except OSError as exc:  # a full disk, a file-size limit, a folder that became read-only
            if exc.filename and not Path(os.path.abspath(exc.filename)).is_relative_to(staging.absolute()):
                raise OptcError(f"{path}: cannot read {exc.filename} while writing ({_reason(exc)})") from exc
            raise WriteError(path, exc) from exc
        if check is not None:
            check(staged_model)
        staged_data = staging / data_name
        try:
            if staged_data.exists():
                os.replace(staged_data, directory / data_name)
            os.replace(staged_model, path)
        except OSError as exc:
            raise WriteError(path, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def staged_to_output(text: str, staged: Path, output: Path) -> str:
    """`text` (a runtime's message about the staged file) naming the output instead of the staging folder."""
    for folder in sorted({str(staged.parent), os.path.abspath(staged.parent)}, key=len, reverse=True):
        for name in (staged.name, staged.name + ".data"):
            text = text.replace(os.path.join(folder, name), str(Path(output).with_name(name)))
        text = text.replace(folder, str(Path(output).parent))
    return text


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and the external data files it references."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next(e.value for e in tensor.external_data if e.key == "location")
            files.add(path.parent / location)
    return sorted(files)


def model_size_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a model and its external data."""
    return sum(f.stat().st_size for f in model_files(path))


def remove_model(path: str | os.PathLike) -> None:
    """Delete a model file and its external data, ignoring what is already gone."""
    with contextlib.suppress(OSError, onnx.onnx_cpp2py_export.checker.ValidationError, DecodeError):
        for file in model_files(path):
            with contextlib.suppress(FileNotFoundError):
                file.unlink()


def to_proto(model: Model, *, max_elements: int | None = None) -> onnx.ModelProto:
    """Serialize to a ModelProto; external tensors keep their references.

    With `max_elements`, initializers larger than that (and external ones) are
    left out and declared in `value_info` instead, so no weight is read or
    copied: this is the form used for printing, hashing and shape inference.
    """
    if max_elements is None:
        return _oir.serde.serialize_model(model)
    graph = model.graph
    kept, elided = [], []
    for value in graph.initializers.values():
        data = value.const_value
        small = data is not None and not isinstance(data, ExternalTensor) and data.size <= max_elements
        (kept if small else elided).append(value)
    view = _oir.GraphView(
        graph.inputs, graph.outputs, nodes=list(graph), initializers=kept,
        name=graph.name, opset_imports=dict(graph.opset_imports),
    )
    proto = onnx.ModelProto(ir_version=model.ir_version)
    for domain, version in sorted(graph.opset_imports.items()):
        proto.opset_import.add(domain=domain, version=version)
    for key, text in model.metadata_props.items():
        proto.metadata_props.add(key=key, value=text)
    _oir.serde.serialize_graph_into(proto.graph, view)
    declared = {v.name for v in proto.graph.value_info}
    for value in elided:
        if value.name not in declared:
            _oir.serde.serialize_value_into(proto.graph.value_info.add(), value)
    return proto


def node_to_proto(node) -> onnx.NodeProto:
    """Serialize one node (inputs and outputs by name, attributes with their exact types)."""
    return _oir.serde.serialize_node(node)


def from_proto(proto: onnx.ModelProto, base_dir: str | os.PathLike = "") -> Model:
    """Deserialize a ModelProto; `base_dir` resolves relative external-data paths."""
    model = _oir.serde.deserialize_model(proto)
    if base_dir:
        _oir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]
