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
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as _oir
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from optc.errors import ModelLoadError, OptcError, WriteError
from optc.files import check_input_kind
from optc.ir.core import ExternalTensor, Model, initializer_bytes

#: Above this many bytes of initializers a model is saved with external data.
EXTERNAL_DATA_THRESHOLD = 1 << 30
#: Tensors smaller than this stay inside the protobuf even when saving external data.
EXTERNAL_TENSOR_MIN_BYTES = 1024


def load_model(path: str | os.PathLike, *, memory_budget: int | None = None) -> Model:
    """Load an ONNX file into the IR, with one clear error for every bad input.

    Every tensor's size is checked against its shape and dtype (inline bytes, and external
    data's offset and length against its file) and external data must lie inside the model's
    folder, before any weight is read. `memory_budget` (bytes) refuses a file whose protobuf
    alone would take more (external data is memory-mapped, not counted).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
    check_input_kind(path, error=ModelLoadError)
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path}: empty file, not an ONNX model")
    if memory_budget is not None:
        from optc.memory import check_budget

        check_budget(str(path), PROTOBUF_MEMORY_FACTOR * size, memory_budget, "loading its protobuf")
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
    _check_text(proto, path)
    _check_attributes(proto, path)
    _check_tensors(proto, path)
    try:
        model = _oir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001 - onnx-ir raises many types on malformed protos
        raise ModelLoadError(f"{path}: malformed ONNX model ({_short(exc)})") from exc
    _oir.external_data.set_base_dir(model.graph, str(path.parent))
    return model


def _check_text(proto: onnx.ModelProto, path: Path) -> None:
    """Every text field (names, op types, domains, keys) is UTF-8: the protobuf parser lets bad bytes through."""
    string = FieldDescriptor.TYPE_STRING
    message = FieldDescriptor.TYPE_MESSAGE
    stack: list[Any] = [proto]
    while stack:
        current = stack.pop()
        for field, value in current.ListFields():
            values = value if _is_repeated(field) else [value]
            if field.type == string:
                bad = next((v for v in values if not isinstance(v, str)), None)
                if bad is not None:
                    raise ModelLoadError(
                        f"{path}: not an ONNX model or truncated ({field.containing_type.name}.{field.name} "
                        f"{bytes(bad)[:40]!r} is not UTF-8 text)"
                    )
            elif field.type == message:
                stack.extend(values)


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


#: A parsed protobuf and its IR take about this many times the file's size.
PROTOBUF_MEMORY_FACTOR = 2

#: TensorProto fields holding typed values, and how many of them each element takes.
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
_COMPLEX = (onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128)


def _all_graphs(proto: onnx.ModelProto) -> Iterator[onnx.GraphProto]:
    """The main graph and every subgraph, however deep."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


def _check_attributes(proto: onnx.ModelProto, path: Path) -> None:
    """Every attribute says its type (onnx-ir keeps an untyped one, then cannot write it back)."""
    for graph in _all_graphs(proto):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.UNDEFINED and not attr.ref_attr_name:
                    raise ModelLoadError(
                        f"{path}: attribute {attr.name!r} of node {node.name or node.op_type!r} has no type"
                    )


def all_tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto of the model (initializers, tensor attributes, subgraphs), with what holds it."""
    for graph in _all_graphs(proto):
        for tensor_proto in graph.initializer:
            yield tensor_proto, f"initializer {tensor_proto.name!r}"
        for sparse in graph.sparse_initializer:
            yield sparse.values, f"sparse initializer {sparse.values.name!r}"
            yield sparse.indices, f"sparse initializer {sparse.values.name!r} (indices)"
        for node in graph.node:
            for attr in node.attribute:
                where = f"attribute {attr.name!r} of node {node.name or node.op_type!r}"
                if attr.HasField("t"):
                    yield attr.t, where
                for tensor_proto in attr.tensors:
                    yield tensor_proto, where
                if attr.HasField("sparse_tensor"):
                    yield attr.sparse_tensor.values, where


def _check_tensors(proto: onnx.ModelProto, path: Path) -> None:
    """Each tensor holds exactly the bytes its shape and dtype need; external data stays in the model's folder."""
    folder = path.parent
    sizes: dict[Path, int] = {}
    for tensor_proto, where in all_tensor_protos(proto):
        if any(d < 0 for d in tensor_proto.dims):
            raise ModelLoadError(f"{path}: {where} has a negative dimension {list(tensor_proto.dims)}")
        try:
            dtype = _oir.DataType(tensor_proto.data_type)
            if dtype == _oir.DataType.UNDEFINED:
                raise ValueError(dtype)
        except ValueError:
            raise ModelLoadError(f"{path}: {where} has unknown data type {tensor_proto.data_type}") from None
        if dtype == _oir.DataType.STRING:
            continue
        elements = math.prod(tensor_proto.dims)
        nbytes = (elements * dtype.bitwidth + 7) // 8
        if tensor_proto.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(tensor_proto, where, nbytes, path, folder, sizes)
        elif tensor_proto.HasField("raw_data"):
            if len(tensor_proto.raw_data) != nbytes:
                raise ModelLoadError(
                    f"{path}: {where} of {dtype.name} {list(tensor_proto.dims)} needs {nbytes} bytes "
                    f"but holds {len(tensor_proto.raw_data)}"
                )
        else:
            held = sum(len(getattr(tensor_proto, field)) for field in _TYPED_FIELDS)
            per_element = 2 if tensor_proto.data_type in _COMPLEX else 1
            needed = (elements + 1) // 2 if dtype.bitwidth == 4 else elements * per_element
            if held != needed and not (held == 0 and elements == 0):
                raise ModelLoadError(
                    f"{path}: {where} of {dtype.name} {list(tensor_proto.dims)} needs {needed} values but holds {held}"
                )


def _check_external(
    tensor_proto: onnx.TensorProto, where: str, nbytes: int, path: Path, folder: Path, sizes: dict[Path, int],
) -> None:
    """External data: inside the model's folder, present, and its offset and length within the file."""
    info = {entry.key: entry.value for entry in tensor_proto.external_data}
    location = info.get("location", "")
    normal = os.path.normpath(location) if location else ""
    if not location or os.path.isabs(location) or normal == ".." or normal.startswith(".." + os.sep) or (
        os.altsep and normal.startswith(".." + os.altsep)
    ):
        raise ModelLoadError(
            f"{path}: external data {location!r} of {where} is outside the model's folder; refusing to read it"
        )
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ModelLoadError(f"{path}: external data of {where} has a malformed offset or length") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelLoadError(f"{path}: external data of {where} has a negative offset or length")
    file = folder / location  # as the reader will open it ("sub/../w.bin" needs a folder sub)
    if file not in sizes:
        if not file.exists():
            raise ModelLoadError(f"{path}: external data file {location!r} is missing")
        if not file.is_file():
            raise ModelLoadError(f"{path}: external data file {location!r} is not a regular file")
        sizes[file] = file.stat().st_size
    if length is not None and length != nbytes:
        raise ModelLoadError(
            f"{path}: external data of {where} has length {length} but its shape and dtype need {nbytes} bytes"
        )
    if offset > sizes[file]:
        raise ModelLoadError(
            f"{path}: external data file {location!r} is truncated "
            f"({where} starts at offset {offset}, beyond the file's {sizes[file]} bytes)"
        )
    if offset + nbytes > sizes[file]:
        raise ModelLoadError(
            f"{path}: external data file {location!r} is truncated "
            f"({where} needs {offset + nbytes} bytes, file has {sizes[file]})"
        )


def has_external_data(model: Model) -> bool:
    """True when any initializer is stored outside the protobuf: external data, or a checkpoint tensor
    read lazily (`optc.frontends.lazy_weights`), so that saving streams tensor by tensor instead of
    building one protobuf of every weight (weights in a spill file do not count)."""
    from optc.ir.spill import is_spilled

    return any((isinstance(v.const_value, ExternalTensor) and not is_spilled(v.const_value))
               or isinstance(v.const_value, _oir.LazyTensor) for v in model.graph.initializers.values())


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
                with _spilled_inline(model):  # a protobuf without external data holds every weight itself
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


@contextlib.contextmanager
def _spilled_inline(model: Model) -> Iterator[None]:
    """Within the block, weights in a spill file (`optc.ir.spill`) are in-memory tensors again."""
    from optc.ir.spill import is_spilled

    swapped = [(v, v.const_value) for v in model.graph.initializers.values() if is_spilled(v.const_value)]
    try:
        for value, spilled in swapped:
            value.const_value = _oir.Tensor(spilled.numpy(), dtype=spilled.dtype, shape=spilled.shape,
                                            name=spilled.name, doc_string=spilled.doc_string,
                                            metadata_props=dict(spilled.metadata_props) or None)
        yield
    finally:
        for value, spilled in swapped:
            value.const_value = spilled


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
